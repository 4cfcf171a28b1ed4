"""What a sparse training step of a trained CLT would touch: per training batch, the share of z that
is active, the share where grad z is needed (JumpReLU: plus its threshold's STE window), and the
share of W_dec's rows (source layer, feature) that get a gradient.

    .venv/bin/python benchmarks/active_rows.py runs/demo/clt/checkpoints/final \
        runs/bench/quality/data-int8-65536 [--tokens 16384] [--batch 256]

Reads the first --tokens tokens of the dataset in the training store's shuffled order, batches of
--batch, through the checkpoint's CLT in training mode (torch grad on, as a training step sees
it). Per batch and layer it counts:
  active          z != 0 (the sparse decode's forward and grad W_dec read these entries)
  grad_z_needed   the entries the decode's backward must compute grad z at (`Activated.grad_needed`:
                  active, plus for JumpReLU |h - theta| < bandwidth / 2)
  rows_active     (source, feature) rows with at least one active token in the batch: the rows of
                  W_dec the reconstruction's gradient reaches, and all that a row-lazy Adam would
                  step without the norm terms
  rows_dead_term  rows the dead-feature term ReLU(theta - h) ||W_dec|| reaches (some token below
                  theta); with it on, every such row gets a gradient
Prints one JSON object: the means over batches, per layer and overall, and the thread count.
docs/performance.md ("Sparse decode") reads the figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clt_forge.artifacts.checkpoint import load_checkpoint
from clt_forge.clt.jumprelu import rectangle
from clt_forge.data.store import ActivationsStore


def measure(checkpoint: Path, dataset: Path, tokens: int, batch_size: int) -> dict:
    clt, normalization, _ = load_checkpoint(checkpoint)
    store = ActivationsStore.from_cache(dataset, batch_size, seed=0)
    keys = ("active", "grad_z_needed", "rows_active", "rows_dead_term")
    sums = {key: torch.zeros(clt.n_layers, dtype=torch.float64) for key in keys}
    batches = 0
    for batch in store:
        if batches * batch_size >= tokens:
            break
        x = normalization.inputs(batch.mlp_in.float())
        with torch.no_grad():
            h, activated = clt.encode_activated(x)
            z = activated.features
            theta = clt.jumprelu_threshold()
            on = z != 0
            needed = on.clone()
            if clt.activation.learns_threshold:
                needed |= rectangle((h - theta) / clt.bandwidth).bool()
        sums["active"] += on.double().mean(dim=(0, 2))
        sums["grad_z_needed"] += needed.double().mean(dim=(0, 2))
        sums["rows_active"] += on.any(dim=0).double().mean(dim=1)
        sums["rows_dead_term"] += (h < theta).any(dim=0).double().mean(dim=1)
        batches += 1
    per_layer = {key: (value / batches).tolist() for key, value in sums.items()}
    return {
        "checkpoint": str(checkpoint),
        "activation": type(clt.activation).__name__,
        "d_features": clt.d_features,
        "bandwidth": clt.bandwidth,
        "batches": batches,
        "batch_size": batch_size,
        "mean": {key: sum(values) / len(values) for key, values in per_layer.items()},
        "per_layer": {key: [round(v, 4) for v in values] for key, values in per_layer.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args.checkpoint, args.dataset, args.tokens, args.batch)
    result["threads"] = args.threads
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
