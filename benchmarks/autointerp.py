"""Autointerp streaming-pass throughput and memory.

    .venv/bin/python benchmarks/autointerp.py DATASET [--tokens 8192] [--d-features 1152] [--threads 2] [--repeats 3]

DATASET is an activation dataset of the embedded model (e.g. `.venv/bin/clt cache out=/tmp/acts`).
The CLT is random at the embedded model's shape (L=30, d_model=576, d_features as given), with
thresholds set so each layer fires on ~50 features per token, like a trained one. Reports, in
one run: tokens/s of the pass from the dataset (read + encode + top-K/sample/statistics
bookkeeping), the same pass with the encoder only, the bookkeeping's share of the pass, the
pass on the fly (model forward included), and peak RSS of the pass at 1x and 10x the token
budget (each in a fresh process). The two dataset passes alternate `--repeats` times and the
medians are reported (the share: the median of each repeat's pair), so that a burst of load
from other processes on a shared machine skews one sample, not the result. Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from statistics import median
from typing import Any

import torch

TARGET_L0 = 50


def collector(d_features: int, seed: int = 0) -> Any:
    from clt_forge.autointerp.collect import Collector, FeatureSlice

    torch.manual_seed(seed)
    n_layers, d_model = 30, 576
    W = [torch.randn(d_features, d_model) / d_model**0.5 for _ in range(n_layers)]
    # unit-variance inputs -> h ~ N(0, 1); threshold at the quantile that leaves TARGET_L0 active
    theta = float(torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - TARGET_L0 / d_features)))
    features = FeatureSlice(
        layers=[layer for layer in range(n_layers) for _ in range(d_features)],
        features=list(range(d_features)) * n_layers,
        W_enc=W,
        b_enc=[torch.zeros(d_features) for _ in range(n_layers)],
        threshold=[torch.full((d_features,), theta) for _ in range(n_layers)],
        in_scale=torch.ones(n_layers),
    )
    return Collector(features, top_k=20, sample=30, silent=10, before=24, after=8)


def unit_scaled(mlp_in: torch.Tensor) -> torch.Tensor:
    return mlp_in / mlp_in.square().mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-6)


def timed_pass(batches: Any, tokens: int, d_features: int, bookkeeping: bool, batch: int = 4096) -> tuple[float, int]:
    from clt_forge.autointerp.source import grouped

    c = collector(d_features)
    start = time.perf_counter()
    for window_tokens, mlp_in in grouped(batches, batch):
        c.update(window_tokens, unit_scaled(mlp_in.float()), bookkeeping=bookkeeping)
        if c.tokens_seen >= tokens:
            break
    return time.perf_counter() - start, c.tokens_seen


def dataset_batches(dataset: str) -> Any:
    from clt_forge.autointerp.source import dataset_windows
    from clt_forge.models.loading import model_config

    return dataset_windows(dataset, model_config("smollm2_135m"))[1]


def memory_probe(dataset: str, tokens: int, d_features: int) -> int:
    """Peak RSS (bytes) of a pass over `tokens` tokens, in this (fresh) process."""
    timed_pass(dataset_batches(dataset), tokens, d_features, bookkeeping=True)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--d-features", type=int, default=1152)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternate the two dataset passes this many times")
    parser.add_argument("--memory-probe", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(memory_probe(args.dataset, args.memory_probe, args.d_features))
        return

    # warm-up (page cache, allocator), then the two dataset passes back to back, alternating
    timed_pass(dataset_batches(args.dataset), 2048, args.d_features, bookkeeping=True)
    full_rates, encoder_rates = [], []
    for _ in range(args.repeats):
        full_s, full_tokens = timed_pass(dataset_batches(args.dataset), args.tokens, args.d_features, True)
        encoder_s, encoder_tokens = timed_pass(dataset_batches(args.dataset), args.tokens, args.d_features, False)
        full_rates.append(full_tokens / full_s)
        encoder_rates.append(encoder_tokens / encoder_s)
    shares = [1 - full / encoder for full, encoder in zip(full_rates, encoder_rates, strict=True)]

    from clt_forge.autointerp.source import model_windows
    from clt_forge.config.schema import DataConfig
    from clt_forge.models.loading import load_model

    model = load_model("smollm2_135m")
    fly_tokens = max(args.tokens // 4, 2032)
    fly_s, fly_seen = timed_pass(model_windows(model, DataConfig(name="bundled"))[1], fly_tokens, args.d_features, True)

    def probe(tokens: int) -> int:
        command = [sys.executable, __file__, args.dataset, "--threads", str(args.threads)]
        command += ["--d-features", str(args.d_features), "--memory-probe", str(tokens)]
        return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])

    small, large = probe(args.tokens // 4), probe(args.tokens * 10 // 4)
    print(
        json.dumps(
            {
                "dataset": args.dataset,
                "shape": {"n_layers": 30, "d_model": 576, "d_features": args.d_features, "l0_per_layer": TARGET_L0},
                "threads": args.threads,
                "tokens": full_tokens,
                "repeats": args.repeats,
                "pass_from_dataset_tokens_per_s": median(full_rates),
                "encoder_only_tokens_per_s": median(encoder_rates),
                "bookkeeping_share_of_pass": median(shares),
                "target_bookkeeping_share": 0.20,
                "each_repeat": {
                    "pass_tokens_per_s": full_rates,
                    "encoder_only_tokens_per_s": encoder_rates,
                    "share": shares,
                },
                "pass_on_the_fly_tokens_per_s": fly_seen / fly_s,
                "peak_rss_bytes": {f"{args.tokens // 4}_tokens": small, f"{args.tokens * 10 // 4}_tokens": large},
                "peak_rss_growth_for_10x_tokens": large / small,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
