"""All of `clt cache`'s figures in one JSON object: the codec table on real activations
(benchmarks/quant_codecs.py: bytes/token, nMSE, EV, bits/value vs the Gaussian bound,
encode/decode MB/s, the paper's per-layer baseline beside every mode) and the end-to-end
caching throughput against the bare model forward (benchmarks/cache_e2e.py).

    .venv/bin/python benchmarks/cache.py [--acts /tmp/acts_8k.pt]

Takes ~15 minutes on a 2-core machine. Each part can also be run alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, *args: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, str(HERE / script), *args], check=True, capture_output=True, text=True, env=env
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--acts", default="/tmp/acts_8k.pt", help="activation cache for the codec table")
    parser.add_argument("--tokens", default="4096", help="tokens for the end-to-end comparison")
    args = parser.parse_args()
    result = {
        "codecs": run("quant_codecs.py", "--acts", args.acts, threads=1),
        "end_to_end": run("cache_e2e.py", "--tokens", args.tokens, "--threads", "2", threads=2),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
