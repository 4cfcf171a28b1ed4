"""Reader throughput: tokens/s the ActivationReader serves from a cached dataset (read, verify,
decode, shuffle, batch), to compare with what a training step consumes.

    .venv/bin/python benchmarks/reader.py DATASET [--batch 1024] [--tokens 32768] [--workers 2]

Make a dataset first, e.g. `.venv/bin/clt cache out=/tmp/acts`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from clt_forge.artifacts.reader import ActivationReader

    reader = ActivationReader(args.dataset, args.batch, workers=args.workers)
    batches = iter(reader)
    next(batches)  # start-up: first group read and decoded
    start = time.perf_counter()
    served = 0
    while served < args.tokens:
        served += next(batches).tokens.numel()
    elapsed = time.perf_counter() - start
    manifest = reader.manifest
    print(
        json.dumps(
            {
                "dataset": args.dataset,
                "quant": manifest.quant,
                "n_layers": manifest.n_layers,
                "d_model": manifest.d_model,
                "batch": args.batch,
                "workers": args.workers,
                "threads": args.threads,
                "tokens": served,
                "tokens_per_s": served / elapsed,
                "fp16_equivalent_MB_per_s": served * manifest.n_layers * manifest.d_model * 2 * 2 / elapsed / 1e6,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
