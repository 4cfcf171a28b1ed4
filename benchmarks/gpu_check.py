"""One-shot checks and timings for a lent GPU machine (torch there, not this project's other deps).

    PYTHONPATH=build/devdeps:. python benchmarks/gpu_check.py --out $OUT     # on the GPU (~3-5 min)
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick --out DIR  # smoke run here (CPU)

build/devdeps holds the pure-Python packages clt_forge imports (jaxtyping, wadler-lindig,
omegaconf, antlr4-python3-runtime, PyYAML, tqdm): `pip install --no-deps --target build/devdeps
...` at the venv's versions; this script also appends it to sys.path when it exists.

It prints one JSON object and writes, as it goes, under --out: env.json, nccl.json,
train_step.jsonl (one row per line, appended as measured), gpu_check.json (everything).
  a. env: torch and CUDA versions, GPU name, bf16 support.
  b. nccl: a process group (nccl on cuda, gloo on cpu) of world size 1 (one GPU allows only
     that: NCCL refuses two ranks on one device), one all_reduce of a known tensor, then per
     activation and decode a small CLT (L=6, D=64, F=128, B=64) wrapped in
     FeatureShardedCLT (as distributed/parallel.py's FeatureParallel does: wrap, loss,
     clip_grad_norm_) against the same CLT unwrapped: forward, loss, backward; the max abs
     difference of the loss, the gradient norm and every gradient (all ~0), in fp32 and in bf16
     autocast, and the relative difference of the bf16 loss to the fp32 one.
  c. train_step: benchmarks/train_step.py's --sparse step in this process at d_features 4608
     (L=30, D=576, B=256), 3 timed steps after one warm-up, most telling rows first: per active
     share (1%, 2%, 5%), per activation (topk, batchtopk, jumprelu), decode dense/sparse x
     optimizer dense/deferred/deferred-bf16 (deferred with W_dec's Adam first moment in bf16),
     fp32; then dense decode in bf16 at 1% per activation. Each row: seconds per step, peak GPU
     memory (allocated GiB / GB, reserved), or an error (OOM, deferred unavailable). Rows after
     --max-seconds (from the script's start) are skipped.
--quick shrinks everything (F=256, L=6, D=128, B=64, 1 step) so it runs on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
if (ROOT / "build" / "devdeps").is_dir():
    sys.path.append(str(ROOT / "build" / "devdeps"))

ACTIVATIONS = ["topk", "batchtopk", "jumprelu"]


def env_info(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device, "python": sys.version}
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu_name": torch.cuda.get_device_name(0),
            "gpu_memory_gib": props.total_memory / 2**30,
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "nccl_available": torch.distributed.is_nccl_available(),
            "nccl_version": str(torch.cuda.nccl.version()),
        }
    return info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_vs_plain(device: str, activation: str, decode: str, bf16: bool) -> dict:
    """Forward + loss + backward through FeatureShardedCLT and through the same CLT unwrapped."""
    import torch

    from clt_forge.clt.loss import clt_loss
    from clt_forge.clt.model import CrossLayerTranscoder
    from clt_forge.distributed.feature_sharding import FeatureShardedCLT

    torch.manual_seed(0)
    n_layers, d_model, d_features, batch = 6, 64, 128, 64
    plain = CrossLayerTranscoder(
        n_layers, d_model, d_features, activation=activation, k=8, decode=decode, device=device
    )
    sharded = FeatureShardedCLT(copy.deepcopy(plain))
    x = torch.randn(batch, n_layers, d_model, device=device)
    y = torch.randn(batch, n_layers, d_model, device=device) * 0.1
    l0, c, dead = 1e-3, 1.0, 1e-5
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        out = plain(x)
        loss = clt_loss(out, y, out.decoder_norms, plain.jumprelu_threshold(), l0, c, dead)
        s_out = sharded(x)
        s_loss, logged = sharded.loss(s_out, y, l0, c, dead)
    loss.total.backward()
    s_loss.total.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in plain.parameters() if p.grad is not None], 1e9)
    s_norm = sharded.clip_grad_norm_(1e9)
    grads = {}
    for (name, p), (_, q) in zip(plain.named_parameters(), sharded.local.named_parameters(), strict=True):
        if p.grad is None or q.grad is None:
            grads[name] = None if p.grad is None and q.grad is None else "grad on one side only"
        else:
            grads[name] = (p.grad - q.grad).abs().max().item()
    numeric = [g for g in grads.values() if isinstance(g, float)]
    return {
        "activation": activation,
        "decode": decode,
        "precision": "bf16" if bf16 else "fp32",
        "loss": loss.total.item(),
        "loss_abs_diff": abs(loss.total.item() - s_loss.total.item()),
        "logged_loss_abs_diff": abs(loss.total.item() - logged.total.item()),
        "reconstruction_max_abs_diff": (out.reconstruction - s_out.reconstruction).abs().max().item(),
        "grad_norm": norm.item(),
        "grad_norm_abs_diff": abs(norm.item() - s_norm.item()),  # float64 sum in the sharded norm
        "grad_max_abs_diff": grads,
        "worst_grad_max_abs_diff": max(numeric) if numeric else None,
        "ok": all(isinstance(g, float) or g is None for g in grads.values()),
    }


def nccl_check(device: str) -> dict:
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    result: dict = {"backend": backend, "world_size": 1}
    start = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        result["init_seconds"] = time.perf_counter() - start
        known = torch.arange(1.0, 9.0, device=device)
        reduced = known.clone()
        dist.all_reduce(reduced)
        result["all_reduce_max_abs_diff"] = (reduced - known).abs().max().item()  # world 1: unchanged
        rows = []
        for activation in ACTIVATIONS:
            for decode in ("dense", "sparse"):
                for bf16 in (False, True):
                    try:
                        rows.append(_sharded_vs_plain(device, activation, decode, bf16))
                    except Exception as exc:
                        rows.append({"activation": activation, "decode": decode, "bf16": bf16, "error": repr(exc)})
        fp32 = {(r["activation"], r["decode"]): r["loss"] for r in rows if r.get("precision") == "fp32"}
        for r in rows:
            if r.get("precision") == "bf16" and (r["activation"], r["decode"]) in fp32:
                ref = fp32[(r["activation"], r["decode"])]
                r["bf16_vs_fp32_loss_rel_diff"] = abs(r["loss"] - ref) / abs(ref)
        result["sharded_vs_plain"] = rows
        worst = [r["worst_grad_max_abs_diff"] for r in rows if r.get("precision") == "fp32"]
        result["fp32_worst_grad_max_abs_diff"] = max((w for w in worst if w is not None), default=None)
        result["fp32_worst_loss_abs_diff"] = max(
            (r["loss_abs_diff"] for r in rows if r.get("precision") == "fp32"), default=None
        )
        result["errors"] = sum("error" in r for r in rows)
    finally:
        dist.destroy_process_group()
    return result


def train_rows(device: str, quick: bool, out: Path, deadline: float) -> list[dict]:
    import train_step

    features, steps, shape = ([256], 1, (6, 128, 64)) if quick else ([4608], 3, train_step.SPARSE_SHAPE)
    decodes, optimizers = ["dense", "sparse"], ["dense", "deferred", "deferred-bf16"]
    specs = []
    for active in (0.01, 0.02, 0.05):
        specs += train_step.sparse_specs(features, ACTIVATIONS, [active], decodes, optimizers, ["fp32"])
    specs += train_step.sparse_specs(features, ACTIVATIONS, [0.01], ["dense"], ["dense"], ["bf16"])
    path = out / "train_step.jsonl"
    return train_step.run_in_process(specs, device, steps, 1, str(path), deadline, shape)


def summary(rows: list[dict]) -> list[dict]:
    """Per (activation, active, optimizer, precision): the sparse over dense decode time, peak GiB."""
    done = {
        (r["activation"], r["active_target"], r["optimizer"], r["precision"], r["decode"]): r
        for r in rows
        if "seconds_per_step" in r
    }
    lines = []
    for (act, active, opt, prec, decode), r in done.items():
        line = {"activation": act, "active": active, "optimizer": opt, "precision": prec, "decode": decode}
        line |= {"seconds": r["seconds_per_step"], "peak_gib": r.get("gpu_peak_allocated_gib")}
        dense = done.get((act, active, opt, prec, "dense"))
        if decode == "sparse" and dense:
            line["sparse_over_dense"] = r["seconds_per_step"] / dense["seconds_per_step"]
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for env.json, nccl.json, train_step.jsonl, ...")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="F=256, L=6, 1 step: a smoke run on CPU")
    parser.add_argument("--max-seconds", type=float, default=420.0, help="skip the train rows left after this")
    parser.add_argument("--skip", nargs="*", default=[], choices=["nccl", "train"], help="parts not to run")
    args = parser.parse_args()
    deadline = time.monotonic() + args.max_seconds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.jsonl").unlink(missing_ok=True)

    def save(name: str, value: dict) -> None:
        (out / name).write_text(json.dumps(value, indent=2))

    report: dict = {"env": env_info(args.device), "quick": args.quick, "max_seconds": args.max_seconds}
    save("env.json", report["env"])
    print(json.dumps(report["env"]), file=sys.stderr, flush=True)
    if "nccl" not in args.skip:
        try:
            report["nccl"] = nccl_check(args.device)
        except Exception as exc:
            report["nccl"] = {"error": repr(exc)}
        save("nccl.json", report["nccl"])
        print(json.dumps(report["nccl"])[:2000], file=sys.stderr, flush=True)
    if "train" not in args.skip:
        rows = train_rows(args.device, args.quick, out, deadline)
        report["train_step"] = rows
        report["train_summary"] = summary(rows)
        report["train_counts"] = {
            "rows": len(rows),
            "errors": sum("error" in r for r in rows),
            "skipped": sum("skipped" in r for r in rows),
        }
    report["seconds_total"] = args.max_seconds - (deadline - time.monotonic())
    save("gpu_check.json", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
