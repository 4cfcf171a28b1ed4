"""How many entries JumpReLU's straight-through window adds on a trained CLT: the share of
(token, layer, feature) entries whose grad z the sparse decode must compute (active, or inside
|h - theta| < eps / 2) at a few bandwidths eps, on a cached dataset's held-out tokens.

    .venv/bin/python benchmarks/ste_window.py runs/demo/activations/held_out CHECKPOINT [CHECKPOINT ...] \
        [--tokens 2048] [--bandwidths 1 0.5 0.25 0.1 0.05 0.02]

Prints one JSON object: per checkpoint, the bandwidth it trained with, the active share, the
median threshold, and the needed share at each bandwidth (`needed`), which is what
clt_forge/clt/activations.py's JumpReLU hands the sparse decode (docs/quality.md, "The STE
bandwidth, measured again"; docs/performance.md, "Sparse decode").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clt_forge.artifacts.activations import read_manifest
from clt_forge.artifacts.checkpoint import load_checkpoint
from clt_forge.data.store import ActivationsStore


@torch.no_grad()
def window_shares(checkpoint: Path, dataset: Path, tokens: int, bandwidths: list[float]) -> dict:
    clt, normalization, info = load_checkpoint(checkpoint)
    n = min(read_manifest(dataset).n_tokens, tokens)
    batch = next(iter(ActivationsStore.from_cache(dataset, n, seed=0, shuffle_chunks=1)))
    x = normalization.inputs(batch.mlp_in.float())
    h = torch.baddbmm(clt.b_enc[:, None, :], x.transpose(0, 1), clt.W_enc)  # [L, B, F]
    theta = clt.log_threshold.exp()[:, None, :]
    u = h - theta
    return {
        "checkpoint": str(checkpoint),
        "trained_bandwidth": info.bandwidth,
        "tokens": n,
        "active": float((u > 0).double().mean()),
        "theta_median": float(theta.median()),
        "needed": {str(eps): float((u / eps > -0.5).double().mean()) for eps in bandwidths},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="a cached activation dataset folder (e.g. its held_out/)")
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--bandwidths", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1, 0.05, 0.02])
    args = parser.parse_args()
    rows = [window_shares(c, args.dataset, args.tokens, args.bandwidths) for c in args.checkpoints]
    print(json.dumps({"windows": rows}, indent=2))


if __name__ == "__main__":
    main()
