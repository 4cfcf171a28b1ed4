"""End-to-end `clt cache` throughput against the bare model forward, in one run.

    .venv/bin/python benchmarks/cache_e2e.py [--tokens 4096] [--threads 2] [--quant int8] [--repeats 3]
        [--variant 'encode=inline' --variant 'encode=background' ...] [OVERRIDE ...]

All run the embedded model over the same windows of the bundled text with the same thread
count: "bare" is only the forward passes that produce the MLP activations, to the last block,
copying them out (`mlp_activations`: what caching cannot avoid); "cache" is the whole CacheJob
(tokenizing, forward, quantizing, zstd, writing, checksums, statistics); "model" is the plain
`model(tokens)` to the logits, for reference. Rounds of every measurement once, best of each and
the median of the per-round ratios, so machine noise hits all alike; and, within each cache run,
the share of its wall time spent in its own model forward (noise-robust: both parts are timed in
the same seconds). Prints one JSON object; the target is cache >= 90% of bare (the strict one:
against "model" the ratio is higher, as the cache skips the unembedding).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quant", default="int8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variant",
        action="append",
        help="space-separated `clt cache` overrides for one variant, timed in the same rounds as the others (repeatable)",
    )
    parser.add_argument("overrides", nargs="*", help="`clt cache` overrides for every variant, e.g. quant.zstd_level=3")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from clt_forge.cache.writer import CacheJob
    from clt_forge.config.compose import compose_stage
    from clt_forge.models import load_model, mlp_activations

    scratch = Path(tempfile.mkdtemp(prefix="clt-cache-bench-"))
    overrides = [f"tokens={args.tokens}", f"quant={args.quant}", "held_out_tokens=0", f"threads={args.threads}"]
    overrides += args.overrides
    variants = {v: v.split() for v in args.variant or [""]}
    cfg = OmegaConf.to_object(compose_stage("cache", [*overrides, f"out={scratch / 'warm'}"]))
    model = load_model(cfg.model)
    job = CacheJob(cfg, scratch / "warm")
    windows = [w for chunk in job.my_windows(model.tokenizer) for w in chunk]
    stored_tokens = sum(w.numel() - 1 for w in windows)

    def bare() -> float:
        start = time.perf_counter()
        stacked = torch.stack(windows)
        for i in range(0, len(windows), cfg.batch_size):
            mlp_activations(model, stacked[i : i + cfg.batch_size])
        return stored_tokens / (time.perf_counter() - start)

    @torch.no_grad()
    def full() -> float:
        start = time.perf_counter()
        stacked = torch.stack(windows)
        for i in range(0, len(windows), cfg.batch_size):
            model(stacked[i : i + cfg.batch_size])
        return stored_tokens / (time.perf_counter() - start)

    forward_shares: dict[str, list[float]] = {}
    encode_seconds: dict[str, list[float]] = {}  # per chunk, inline encoding only

    def cache(name: str, variant: list[str], out: Path) -> float:
        run_cfg = OmegaConf.to_object(compose_stage("cache", [*overrides, *variant, f"out={out}"]))
        job, spent = CacheJob(run_cfg, out), {"_forward": [0.0], "_encode": [0.0]}

        def timed(method: str) -> Any:  # a step of the job, timed where it runs
            def run(*args: Any) -> Any:
                start = time.perf_counter()
                result = getattr(CacheJob, method)(job, *args)
                spent[method].append(time.perf_counter() - start)
                return result

            return run

        job._forward, job._encode = timed("_forward"), timed("_encode")  # type: ignore[method-assign]
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout pure JSON
            job.run(model)
        elapsed = time.perf_counter() - start
        forward_shares.setdefault(name, []).append(sum(spent["_forward"]) / elapsed)
        encode_seconds.setdefault(name, []).extend(spent["_encode"][1:])
        shutil.rmtree(out)
        return stored_tokens / elapsed

    bare(), full()  # warm-up
    runs: dict[str, list[float]] = {"bare": [], "model": [], **{f"cache {v}".strip(): [] for v in variants}}
    for repeat in range(args.repeats):  # rounds: every measurement once, so load bursts hit all alike
        runs["bare"].append(bare())
        for name, variant in variants.items():
            runs[f"cache {name}".strip()].append(cache(name, variant, scratch / f"run{repeat}"))
        runs["model"].append(full())
    shutil.rmtree(scratch, ignore_errors=True)
    result: dict[str, object] = {
        "model": cfg.model.name,
        "quant": args.quant,
        "overrides": args.overrides,
        "threads": args.threads,
        "tokens": stored_tokens,
        "repeats": args.repeats,
        "bare_forward_tokens_per_s": max(runs["bare"]),
        "model_forward_tokens_per_s": max(runs["model"]),
        "target_cache_vs_bare": 0.9,
    }
    for name in variants:
        key = f"cache {name}".strip()
        result[key] = {
            "tokens_per_s": max(runs[key]),
            "cache_vs_bare": max(runs[key]) / max(runs["bare"]),  # best against best
            "cache_vs_bare_per_round_median": statistics.median(
                c / b for c, b in zip(runs[key], runs["bare"], strict=True)
            ),
            "cache_vs_model": max(runs[key]) / max(runs["model"]),
            # share of the job's wall time spent in its own model forward (median over rounds):
            # what cache_vs_bare is when the job's forward runs as fast as the bare one, measured
            # within each run, so it does not depend on how busy the machine was in which round
            "forward_share_of_cache_time": statistics.median(forward_shares[name]),
            "encode_s_per_chunk_median": statistics.median(encode_seconds[name] or [0.0]),
            "chunk_tokens": cfg.chunk_tokens,
        }
    result["runs"] = runs
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
