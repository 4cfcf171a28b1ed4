"""One TopK training step with W_dec's Adam dense (`optim.decoder_grad=full`) against row-lazy
(`rows`, clt_forge/clt/lazy_adam.py), as the share of W_dec's rows a batch touches falls.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lazy_adam.py [--d-features 768] [--k 10] [--skew 0 1 2]

L=30, d_model=576, batch 256, sparse decode, no dead-feature term (with it every row is touched).
Random activations touch nearly every row (1 - (1 - k/F)^256); a trained CLT's features fire at
very different rates, which --skew imitates: b_enc rises linearly over the features by 3 x skew,
so a few features win most tokens. Every step reads a fresh random batch (the same sequence for
both modes), so rows go untouched for a while and `rows` pays their catch-up. Each (skew, mode)
runs in its own subprocess; prints one JSON object: per skew the touched share of rows per step,
the median seconds per step of each mode over --steps steps after one warm-up, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(mode: str, skew: float, d_features: int, k: int, steps: int) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from clt_forge.clt.lazy_adam import enable_row_lazy_adam
    from clt_forge.clt.loss import clt_loss
    from clt_forge.clt.model import CrossLayerTranscoder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    n_layers, d_model, batch = 30, 576, 256
    clt = CrossLayerTranscoder(n_layers, d_model, d_features, activation="topk", k=k, decode="sparse")
    with torch.no_grad():
        clt.b_enc += torch.linspace(3 * skew, 0, d_features)[None, :]
    optimizer = torch.optim.Adam([p for p in clt.parameters() if p.requires_grad], lr=1e-4, fused=True)
    sink = enable_row_lazy_adam(clt, optimizer, reads_all_rows=False) if mode == "rows" else None
    generator = torch.Generator().manual_seed(1)
    times, touched = [], []
    for _ in range(steps + 1):
        x = torch.randn(batch, n_layers, d_model, generator=generator)
        y = torch.randn(batch, n_layers, d_model, generator=generator) * 0.1
        start = time.perf_counter()
        out = clt(x)
        loss = clt_loss(out, y, out.decoder_norms, clt.jumprelu_threshold(), 0.0)
        loss.total.backward()
        optimizer.step()
        if sink is not None:
            sink.adam_step(optimizer, clt.W_dec)
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        touched.append(float((out.features != 0).any(0).double().mean()))
    return {"seconds_per_step": statistics.median(times[1:]), "touched_rows": statistics.mean(touched[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-features", type=int, default=768)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--skew", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "SKEW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], float(args.worker[1]), args.d_features, args.k, args.steps)))
        return
    rows = []
    for skew in args.skew:
        row: dict = {"skew": skew}
        for mode in ("full", "rows"):
            command = [sys.executable, __file__, "--worker", mode, str(skew), "--d-features", str(args.d_features)]
            command += ["--k", str(args.k), "--steps", str(args.steps)]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            row[f"{mode}_seconds"] = result["seconds_per_step"]
            row["touched_rows"] = result["touched_rows"]
        row["rows_over_full"] = row["rows_seconds"] / row["full_seconds"]
        rows.append(row)
    shape = {"n_layers": 30, "d_model": 576, "batch": 256, "d_features": args.d_features, "k": args.k}
    print(json.dumps({"shape": shape, "threads": 1, "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
