"""What a linear skip connection alone can explain: per layer, the held-out EV of the
least-squares affine map from the MLP input to the MLP output, fitted on a cached dataset.

    .venv/bin/python benchmarks/linear_probe.py runs/demo/activations [--tokens 32768] [--ridge 1e-4]

Fits on the first --tokens tokens of the dataset (float64, centred, the Gram matrix's diagonal
raised by --ridge times its mean) and scores on the dataset's held_out/ folder. Prints one JSON
object: per-layer EV, their mean and median. docs/quality.md ("The skip connection") compares
these figures with the EV of CLTs trained with and without `clt.skip`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clt_forge.artifacts.activations import read_manifest
from clt_forge.data.store import ActivationsStore


def load(folder: Path, tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    manifest = read_manifest(folder)
    n = min(manifest.n_tokens, tokens or manifest.n_tokens)
    batch = next(iter(ActivationsStore.from_cache(folder, n, seed=0, shuffle_chunks=1)))
    return batch.mlp_in.float(), batch.mlp_out.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--ridge", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x_fit, y_fit = load(args.dataset, args.tokens)
    x_test, y_test = load(args.dataset / "held_out", None)
    evs = []
    for layer in range(x_fit.shape[1]):
        x, y = x_fit[:, layer].double(), y_fit[:, layer].double()
        x_mean, y_mean = x.mean(0), y.mean(0)
        gram = (x - x_mean).T @ (x - x_mean)
        gram.diagonal().add_(args.ridge * float(gram.diagonal().mean()))
        weight = torch.linalg.solve(gram, (x - x_mean).T @ (y - y_mean))
        target = y_test[:, layer].double()
        residual = target - (y_mean + (x_test[:, layer].double() - x_mean) @ weight)
        evs.append(float(1 - residual.square().sum() / (target - target.mean(0)).square().sum()))
    ordered = sorted(evs)
    print(
        json.dumps(
            {
                "dataset": str(args.dataset),
                "fit_tokens": x_fit.shape[0],
                "held_out_tokens": x_test.shape[0],
                "ridge": args.ridge,
                "ev": [round(e, 4) for e in evs],
                "ev_mean": sum(evs) / len(evs),
                "ev_median": (ordered[(len(evs) - 1) // 2] + ordered[len(evs) // 2]) / 2,
            }
        )
    )


if __name__ == "__main__":
    main()
