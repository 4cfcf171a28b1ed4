#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every check CI runs: ruff lint + format, mypy, pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k cache -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/ci/slurm.sh  # Debian's SLURM + munge for tests/test_slurm.py (a real one-node cluster)
bash scripts/ci/chromium.sh  # Debian's Chromium for the browser tests (tests/test_serve.py)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy clt_forge
echo "== pytest"
.venv/bin/python -m pytest -q "$@"
