"""Where a GPU training step's time goes (torch.profiler), dense vs sparse decode, full vs blocks.

    PYTHONPATH=build/devdeps:. python benchmarks/gpu_profile.py --out DIR

At L=30, D=576, B=256, F=4608, TopK at 1% active (as benchmarks/train_step.py --sparse): prints
one JSON object, per variant the step time and the 15 ops / kernels with the most self time (CUDA
time on a GPU, CPU time elsewhere); the full profiler tables go to DIR/profile-<variant>.txt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clt_forge.clt.deferred import enable_deferred_decoder
from clt_forge.clt.loss import clt_loss
from clt_forge.clt.model import CrossLayerTranscoder

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SYNC = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
ACTIVITIES = [torch.profiler.ProfilerActivity.CPU] + (
    [torch.profiler.ProfilerActivity.CUDA] if DEVICE == "cuda" else []
)

VARIANTS = (("dense", False), ("sparse", False), ("sparse", True))  # (decode, decoder_grad=blocks)


def variant(decode: str, blocks: bool, out: Path, d_features: int) -> dict:
    torch.manual_seed(0)
    model = CrossLayerTranscoder(
        30, 576, d_features, activation="topk", k=round(0.01 * d_features), decode=decode, device=DEVICE
    )
    if blocks:
        enable_deferred_decoder(model)
    x, y = torch.randn(256, 30, 576, device=DEVICE), torch.randn(256, 30, 576, device=DEVICE) * 0.1
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step() -> None:
        out = model(x)
        loss = clt_loss(out, y, out.decoder_norms, model.jumprelu_threshold(), 0.0, dead_coefficient=1e-5)
        loss.total.backward()
        optimizer.step()
        if blocks:
            model.decoder_grad.adam_step(optimizer, model.W_dec)
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    SYNC()
    start = time.perf_counter()
    for _ in range(3):
        step()
    SYNC()
    seconds = (time.perf_counter() - start) / 3
    with torch.profiler.profile(activities=ACTIVITIES) as prof:
        step()
        SYNC()
    name = f"{decode}-{'blocks' if blocks else 'full'}"
    table = prof.key_averages().table(
        sort_by="cuda_time_total" if DEVICE == "cuda" else "cpu_time_total", row_limit=30, max_name_column_width=60
    )
    (out / f"profile-{name}.txt").write_text(table)
    return {"variant": name, "seconds": seconds, "top_self_ms": _top(prof.key_averages(), 15)}


def _top(events: list, n: int) -> list[dict]:
    """The `n` ops / kernels with the most self time on the profiled device, in ms."""
    attr = ("self_device_time_total", "self_cuda_time_total") if DEVICE == "cuda" else ("self_cpu_time_total",)
    timed = [(e.key, next(getattr(e, a) for a in attr if hasattr(e, a)) / 1000.0) for e in events]
    return [{"name": name, "ms": round(ms, 3)} for name, ms in sorted(timed, key=lambda t: -t[1])[:n]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--d-features", type=int, default=4608)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [variant(decode, blocks, args.out, args.d_features) for decode, blocks in VARIANTS]
    print(json.dumps({"device": DEVICE, "d_features": args.d_features, "variants": rows}, indent=1))


if __name__ == "__main__":
    main()
