"""Benchmark one CLT training step on CPU against this machine's own matmul throughput (--sparse: also on CUDA).

The one job of this file: print one JSON object to stdout with
  - matmul: fp32 square-GEMM GFLOP/s (torch.mm, best of a few) at each thread count;
  - steps: per (config, threads) the median seconds per full training step (forward, eq.-6
    loss, backward, Adam step), tokens/s, peak RSS, and achieved GFLOP/s counted by the dense
    formula forward = 2 B L D F + 2 B F D L (L + 1) / 2, step = 3 x forward, plus that as a
    fraction of the same thread count's matmul GFLOP/s;
  - adam: one optimizer step over config (a)'s parameters for torch's fused / foreach /
    for-loop Adam (the step uses --adam, fused by default: the fastest here by 5-10x);
  - with --layouts, the decode forward + backward time of the candidate W_dec layouts;
  - other_processes_cpu: the share of the machine's CPU that other processes used while a
    measurement ran (0 = quiet; 0.5 on 2 cores = one core taken, which ruins 2-thread figures).
Each measurement runs in its own subprocess, so peak RSS (ru_maxrss) is per configuration.

--sparse instead times one step at L=30, d_model=576, batch 256 per (d_features, activation,
active share, decode dense|sparse, --optimizer dense|deferred|deferred-bf16, --precision fp32|bf16).
bf16 runs the forward and loss under torch.autocast (as training/runner.py does) and has dense-decode
rows only (the sparse decode runs dense for non-fp32 dtypes). deferred calls
clt_forge.clt.deferred.enable_deferred_decoder(model) and, after optimizer.step(),
model.decoder_grad.adam_step(optimizer, model.W_dec); deferred-bf16 the same with W_dec's Adam
first moment in bfloat16 (optim.decoder_grad=blocks optim.exp_avg_dtype=bfloat16); where that
import fails its rows record {"error": "unavailable: ..."}. On cpu each step runs in a subprocess
(peak RSS per row) and dense and sparse share a row; on --device cuda the rows run in this process
one after another (CUDA starts once), timed between torch.cuda.synchronize() calls, with peak GPU memory
(max_memory_allocated from the model's build, in bytes, GiB and GB; max_memory_reserved);
everything is freed between rows, a failing row (OOM) records {"error": ...} and the run goes
on, and rows after --max-seconds are skipped with a note. Rows go to stderr as they come and,
with --out FILE, are appended to FILE as JSON lines at once (a timeout keeps them).

    .venv/bin/python benchmarks/train_step.py            # full run (~6 minutes on 2 cores)
    .venv/bin/python benchmarks/train_step.py --quick    # smoke run (seconds)
    .venv/bin/python benchmarks/train_step.py --layouts  # also compare decoder layouts
    .venv/bin/python benchmarks/train_step.py --sparse --threads 1 --sparse-features 576 1152
                                                        # dense vs sparse decode per activation
    python benchmarks/train_step.py --sparse --device cuda --sparse-features 4608 \
        --optimizer dense deferred deferred-bf16 --precision fp32 bf16 --out rows.jsonl  # on a GPU (gpu_check.py)

CPU steps run with malloc keeping freed memory from the second step on, as `clt train` sets it
(clt_forge/heap.py); `--malloc system` keeps glibc's default. Rows record it (`malloc`).
`--dead-coefficient` sets the --sparse step's dead-feature term (1e-5 by default; 0 turns it off),
`--bandwidth` its JumpReLU STE bandwidth (clt.jumprelu_bandwidth's default unless given), which
decides how many entries need grad z (`grad_z_needed`), and `--native auto|on|off` the deferred
optimizers' optim.native_kernel (auto by default, as `clt train`; rows record `native_kernel_ran`).

Configs: (a) L=30, d_model=576, d_features=1152, batch 256 tokens; (b) L=12, d_model=768,
d_features=1536, batch 512. Inputs are synthetic random activations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import clt_forge  # noqa: F401  (its import sets THP_MEM_ALLOC_ENABLE, as `clt` runs; the workers inherit it)

CONFIGS = {
    "a": {"n_layers": 30, "d_model": 576, "d_features": 1152, "batch": 256},
    "b": {"n_layers": 12, "d_model": 768, "d_features": 1536, "batch": 512},
    "quick": {"n_layers": 6, "d_model": 128, "d_features": 256, "batch": 128},
}
SPARSE_SHAPE = (30, 576, 256)  # --sparse: n_layers, d_model, batch
SPARSE_ACTIVATIONS = ("topk", "batchtopk", "jumprelu")
MALLOC_ENV = "CLT_BENCH_MALLOC"  # --malloc, handed to the worker subprocesses


def dense_forward_flops(n_layers: int, d_model: int, d_features: int, batch: int) -> float:
    """2 B L D F (encode) + 2 B F D L (L + 1) / 2 (decode over the real (source, target) pairs)."""
    return (
        2.0 * batch * n_layers * d_model * d_features
        + 2.0 * batch * d_features * d_model * n_layers * (n_layers + 1) / 2
    )


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # ru_maxrss is KiB on Linux


def worker_matmul(threads: int, sizes: list[int], repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    result = {}
    for n in sizes:
        a = torch.randn(n, n)
        b = torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
        result[str(n)] = 2.0 * n**3 / best / 1e9
    return {"threads": threads, "gflops_by_size": result, "gflops": max(result.values())}


def worker_step(threads: int, config: str, warmup: int, steps: int, adam: str) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from clt_forge.clt.loss import clt_loss
    from clt_forge.clt.model import CrossLayerTranscoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = CONFIGS[config]
    n_layers, d_model, d_features, batch = cfg["n_layers"], cfg["d_model"], cfg["d_features"], cfg["batch"]
    model = CrossLayerTranscoder(n_layers, d_model, d_features)
    # Synthetic data: x [batch, n_layers, d_model] inputs, y the same shape as targets.
    x = torch.randn(batch, n_layers, d_model)
    y = torch.randn(batch, n_layers, d_model) * 0.1
    opt_kwargs = {"fused": True} if adam == "fused" else {"foreach": True}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, **opt_kwargs)

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        out = model(x)
        loss = clt_loss(
            out, y, out.decoder_norms, model.jumprelu_threshold(), l0_coefficient=1e-3, c=1.0, dead_coefficient=1e-5
        )
        loss.total.backward()
        mid = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        return end - start, end - mid

    step()
    malloc = _set_malloc()  # after the first step, as `clt train` does
    for _ in range(warmup - 1):
        step()
    load = _OtherLoad()
    times, opt_times = [], []
    for _ in range(steps):
        total, opt = step()
        times.append(total)
        opt_times.append(opt)
    seconds = statistics.median(times)
    flops = 3.0 * dense_forward_flops(n_layers, d_model, d_features, batch)
    return {
        "config": config,
        **cfg,
        "threads": threads,
        "adam": adam,
        "seconds_per_step": seconds,
        "seconds_per_step_all": times,
        "seconds_per_step_min": min(times),
        "seconds_optimizer": statistics.median(opt_times),
        "tokens_per_s": batch / seconds,
        "achieved_gflops": flops / seconds / 1e9,
        "step_gflop_dense": flops / 1e9,
        "peak_rss_mib": _peak_rss_mib(),
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "malloc": malloc,
        "other_processes_cpu": load.fraction(),
    }


def worker_layouts(threads: int, config: str, repeats: int) -> dict:
    """Decode forward + backward (the GEMMs that dominate a step, the norm-gradient pass
    included) for three W_dec layouts, interleaved, best of `repeats`; gradient buffers are
    preallocated for all three so only the layouts differ."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from clt_forge.clt.model import _decode_packed, _source_block, pair_offsets

    torch.set_num_threads(threads)
    cfg = CONFIGS[config]
    n_layers, d_model, d_features, batch = cfg["n_layers"], cfg["d_model"], cfg["d_features"], cfg["batch"]
    n_pairs = n_layers * (n_layers + 1) // 2
    dense_flops = 3 * 2.0 * batch * d_features * d_model * n_pairs  # forward + 2 backward GEMMs
    z = torch.randn(n_layers, batch, d_features).permute(1, 0, 2)  # [B, L, F] as encode makes it
    g = torch.randn(batch, n_layers, d_model)  # grad of the reconstruction
    coef = torch.randn(n_layers, d_features)  # grad of the norms / norms
    offsets = pair_offsets(n_layers)

    # 1. packed [F, P, D], source-major pairs (the model's layout): L GEMMs per pass.
    w_packed = torch.randn(d_features, n_pairs, d_model).mul_(0.01)
    grad_packed = torch.empty_like(w_packed)

    def packed() -> None:
        _decode_packed(z, w_packed, offsets)
        grad_z = torch.empty(n_layers, batch, d_features)
        for s in range(n_layers):
            torch.mm(g[:, s:].reshape(batch, -1), _source_block(w_packed, offsets, s).t(), out=grad_z[s])
        for s in range(n_layers):
            dest = _source_block(grad_packed, offsets, s)
            torch.mul(_source_block(w_packed, offsets, s), coef[s, :, None], out=dest)
            dest.addmm_(z[:, s].t(), g[:, s:].reshape(batch, -1))

    # 2. masked dense [L F, L D]: one GEMM per pass; target < source blocks held at zero.
    w_dense = torch.randn(n_layers * d_features, n_layers * d_model).mul_(0.01)
    grad_dense = torch.empty_like(w_dense)
    grad_dense_4d = grad_dense.view(n_layers, d_features, n_layers, d_model)
    w_dense_4d = w_dense.view(n_layers, d_features, n_layers, d_model)
    z_flat, g_flat = z.reshape(batch, -1), g.reshape(batch, -1)

    def masked_dense() -> None:
        torch.mm(z_flat, w_dense)
        torch.mm(g_flat, w_dense.t())
        torch.mul(w_dense_4d, coef[:, :, None, None], out=grad_dense_4d)
        grad_dense.addmm_(z_flat.t(), g_flat)
        for s in range(1, n_layers):  # mask the gradient of the target < source blocks
            grad_dense_4d[s, :, :s] = 0

    # 3. pairs [P, F, D]: one bmm over the P pairs, z gathered per pair, outputs index-added.
    w_pairs = torch.randn(n_pairs, d_features, d_model).mul_(0.01)
    grad_pairs = torch.empty_like(w_pairs)
    src = torch.tensor([s for s in range(n_layers) for _ in range(s, n_layers)])
    tgt = torch.tensor([t for s in range(n_layers) for t in range(s, n_layers)])

    def pairs() -> None:
        zp = z.transpose(0, 1)[src]  # [P, B, F]
        torch.zeros(n_layers, batch, d_model).index_add_(0, tgt, torch.bmm(zp, w_pairs))
        gp = g.transpose(0, 1)[tgt]  # [P, B, D]
        torch.zeros(n_layers, batch, d_features).index_add_(0, src, torch.bmm(gp, w_pairs.transpose(1, 2)))
        torch.mul(w_pairs, coef[src][:, :, None], out=grad_pairs)
        grad_pairs.baddbmm_(zp.transpose(1, 2), gp)

    fns = {"packed_F_P_D": packed, "masked_dense_LF_LD": masked_dense, "pairs_P_F_D_bmm": pairs}
    best = dict.fromkeys(fns, float("inf"))
    load = _OtherLoad()
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {
        "config": config,
        "threads": threads,
        "seconds_best": best,
        "achieved_gflops_dense": {k: dense_flops / v / 1e9 for k, v in best.items()},
        "other_processes_cpu": load.fraction(),
    }


def worker_adam(threads: int, config: str, repeats: int) -> dict:
    """One Adam step over a CLT's parameters, per torch implementation (median of `repeats`)."""
    import torch

    torch.set_num_threads(threads)
    cfg = CONFIGS[config]
    n_layers, d_model, d_features = cfg["n_layers"], cfg["d_model"], cfg["d_features"]
    n_pairs = n_layers * (n_layers + 1) // 2
    shapes = [
        (n_layers, d_model, d_features),
        (n_layers, d_features),
        (n_layers, d_features),
        (d_features, n_pairs, d_model),
        (n_layers, d_model),
    ]
    result = {}
    for name, kwargs in {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "for_loop": {"foreach": False},
    }.items():
        params = [torch.nn.Parameter(torch.randn(shape) * 0.01) for shape in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = torch.optim.Adam(params, lr=1e-4, **kwargs)
        optimizer.step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        result[name] = statistics.median(times)
        del optimizer, params
    return {"config": config, "threads": threads, "seconds_per_step": result}


class _OtherLoad:
    """Share of the machine's CPU time used by other processes since construction (0 = quiet)."""

    def __init__(self) -> None:
        self.busy, self.own, self.wall = self._busy(), self._own(), time.perf_counter()

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def fraction(self) -> float | None:
        try:
            busy = self._busy() - self.busy
        except OSError:
            return None
        own = self._own() - self.own
        wall = time.perf_counter() - self.wall
        return max(0.0, busy - own) / (wall * (os.cpu_count() or 1))


def worker_sparse(
    threads: int,
    d_features: int,
    activation: str,
    active: float,
    decode: str,
    steps: int,
    device: str = "cpu",
    precision: str = "fp32",
    optimizer_mode: str = "dense",
    shape: tuple[int, int, int] = SPARSE_SHAPE,
    dead_coefficient: float = 1e-5,
    bandwidth: float | None = None,
    native_kernel: str = "auto",
) -> dict:
    """One training step (forward, loss, backward, fused Adam) at L=30, D=576, B=256 (`shape`) with
    about `active` of the features on: topk / batchtopk with k = active * F; jumprelu with b_enc
    shifted so that share of pre-activations exceeds theta = 0.03 (a trained-like CLT) and the STE
    bandwidth `bandwidth` (None: clt.jumprelu_bandwidth's default). bf16: forward and loss under
    autocast. deferred: W_dec's Adam step block by block (clt_forge.clt.deferred); deferred-bf16:
    with its first moment in bf16; both with optim.native_kernel=`native_kernel` (rows record whether
    the native kernel ran). On cuda: synchronized timing and peak GPU memory from model build."""
    import contextlib

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from clt_forge.clt.loss import clt_loss
    from clt_forge.clt.model import CrossLayerTranscoder
    from clt_forge.config.schema import CLTConfig

    enable_deferred = None
    if optimizer_mode in ("deferred", "deferred-bf16"):
        try:
            from clt_forge.clt.deferred import enable_deferred_decoder as enable_deferred
        except ImportError as exc:
            raise RuntimeError(f"unavailable: {exc}") from None
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else lambda: None
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    n_layers, d_model, batch = shape
    k = max(1, round(active * d_features))
    bandwidth = CLTConfig().jumprelu_bandwidth if bandwidth is None else bandwidth
    model = CrossLayerTranscoder(
        n_layers, d_model, d_features, bandwidth=bandwidth, activation=activation, k=k, decode=decode, device=device
    )
    if enable_deferred is not None:
        exp_avg_dtype = torch.bfloat16 if optimizer_mode == "deferred-bf16" else torch.float32
        enable_deferred(model, exp_avg_dtype=exp_avg_dtype, native_kernel=native_kernel)
    x = torch.randn(batch, n_layers, d_model, device=device)
    y = torch.randn(batch, n_layers, d_model, device=device) * 0.1
    if activation == "jumprelu":
        with torch.no_grad():
            h = model.encode(x)[0].transpose(0, 1).reshape(n_layers, -1)
            model.b_enc -= (torch.quantile(h[:, :: max(1, h.shape[1] // 100_000)], 1 - active, dim=1) - 0.03)[:, None]
            del h
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    l0 = 1e-3 if activation == "jumprelu" else 0.0
    _, activated = model.encode_activated(x)  # what this step's activation keeps, and where grad z is read
    needed = activated.grad_needed
    record = {
        "active": (activated.features != 0).float().mean().item(),
        "grad_z_needed": needed.float().mean().item() if needed is not None else 1.0,
    }
    del activated, needed
    bf16 = precision == "bf16"

    def step() -> float:
        sync()
        start = time.perf_counter()
        autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            out = model(x)
            loss = clt_loss(
                out, y, out.decoder_norms, model.jumprelu_threshold(), l0, dead_coefficient=dead_coefficient
            )
        loss.total.backward()
        optimizer.step()
        if enable_deferred is not None:
            model.decoder_grad.adam_step(optimizer, model.W_dec)
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    step()
    malloc = None if cuda else _set_malloc()  # after the first step, as `clt train` does
    times = [step() for _ in range(steps)]
    gpu = {}
    if cuda:
        peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        gpu = {
            "gpu_peak_allocated_bytes": peak,
            "gpu_peak_allocated_gib": peak / 2**30,
            "gpu_peak_allocated_gb": peak / 1e9,
            "gpu_peak_reserved_bytes": reserved,
            "gpu_peak_reserved_gib": reserved / 2**30,
        }
    return {
        "n_layers": n_layers,
        "d_model": d_model,
        "batch": batch,
        "d_features": d_features,
        "threads": threads,
        "device": device,
        "precision": precision,
        "optimizer": optimizer_mode,
        "activation": activation,
        "decode": decode,
        "k": k,
        "active_target": active,
        "dead_coefficient": dead_coefficient,
        "bandwidth": bandwidth,
        "native_kernel": native_kernel if enable_deferred is not None else None,
        "native_kernel_ran": getattr(model.decoder_grad, "norms", None) is not None,
        **record,
        "seconds_per_step": statistics.median(times),
        "seconds_per_step_all": times,
        "peak_rss_mib": _peak_rss_mib(),
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "malloc": malloc,
        **gpu,
    }


def _set_malloc() -> str:
    """In a CPU step worker: malloc as `--malloc` says (keep: as `clt train` sets it); the mode."""
    from clt_forge.heap import keep_freed_memory

    mode = os.environ.get(MALLOC_ENV, "keep")
    if mode == "keep" and not keep_freed_memory():
        mode = "system (keep_freed_memory unavailable)"
    return mode


def _run_worker(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config, few steps: a smoke run")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--configs", nargs="+", default=None, help="subset of a, b (default both; quick: quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per config (default 5; quick 2)")
    parser.add_argument("--adam", choices=["fused", "foreach"], default="fused", help="Adam implementation of the step")
    parser.add_argument("--layouts", action="store_true", help="also time decode forward + backward per W_dec layout")
    parser.add_argument("--sparse", action="store_true", help="only dense vs sparse decode steps per activation")
    parser.add_argument("--sparse-features", type=int, nargs="+", default=[576, 1152], help="d_features for --sparse")
    parser.add_argument("--active", type=float, nargs="+", default=[0.01, 0.02, 0.05], help="active shares, --sparse")
    parser.add_argument(
        "--activations", nargs="+", choices=SPARSE_ACTIVATIONS, default=list(SPARSE_ACTIVATIONS), help="--sparse"
    )
    parser.add_argument("--device", default="cpu", help="--sparse only: cpu (a subprocess per step) or cuda")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"], help="--sparse")
    parser.add_argument(
        "--optimizer", nargs="+", choices=["dense", "deferred", "deferred-bf16"], default=["dense"], help="--sparse"
    )
    parser.add_argument(
        "--dead-coefficient", type=float, default=1e-5,
        help="--sparse: the dead-feature term's coefficient in the step's loss (0: off, as the TopK recipe trains)",
    )  # fmt: skip
    parser.add_argument(
        "--bandwidth", type=float, default=None,
        help="--sparse: the JumpReLU STE bandwidth (default: clt.jumprelu_bandwidth's); it sets how many entries need grad z",
    )  # fmt: skip
    parser.add_argument(
        "--native", choices=["auto", "on", "off"], default="auto",
        help="--sparse deferred optimizers: optim.native_kernel (W_dec's Adam step by the C kernel after a sparse CPU decode)",
    )  # fmt: skip
    parser.add_argument("--out", help="--sparse: also append each row to this file as one JSON line")
    parser.add_argument("--max-seconds", type=float, default=None, help="--sparse cuda: skip rows after this")
    parser.add_argument(
        "--malloc", choices=["keep", "system"], default="keep",
        help="CPU steps: keep freed memory in the process as `clt train` does (clt_forge/heap.py), or glibc's default",
    )  # fmt: skip
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.worker:
        os.environ[MALLOC_ENV] = args.malloc  # the workers are subprocesses: they read it from here
    if args.device != "cpu" and not args.sparse:
        parser.error("--device applies to --sparse only")

    if args.worker:
        kind, *rest = args.worker
        if kind == "matmul":
            out = worker_matmul(int(rest[0]), [int(s) for s in rest[1].split(",")], int(rest[2]))
        elif kind == "step":
            out = worker_step(int(rest[0]), rest[1], int(rest[2]), int(rest[3]), rest[4])
        elif kind == "sparse":
            try:
                out = worker_sparse(
                    int(rest[0]), int(rest[1]), rest[2], float(rest[3]), rest[4], int(rest[5]), "cpu", rest[6], rest[7],
                    dead_coefficient=float(rest[8]), bandwidth=None if rest[9] == "default" else float(rest[9]),
                    native_kernel=rest[10],
                )  # fmt: skip
            except Exception as exc:
                out = {"error": str(exc), "error_type": type(exc).__name__}
        elif kind == "adam":
            out = worker_adam(int(rest[0]), rest[1], int(rest[2]))
        else:
            out = worker_layouts(int(rest[0]), rest[1], int(rest[2]))
        print(json.dumps(out))
        return

    if args.sparse:
        print(json.dumps(sparse_report(args), indent=2))
        return
    configs = args.configs or (["quick"] if args.quick else ["a", "b"])
    steps = args.steps or (2 if args.quick else 5)
    warmup = 1 if args.quick else 2
    sizes, repeats = ("1024", 2) if args.quick else ("2048,4096", 3)
    import torch

    report: dict = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
        },
        "target_fraction_of_matmul": 0.5,
        "matmul": {},
        "steps": [],
    }
    for threads in args.threads:
        report["matmul"][str(threads)] = _run_worker(["matmul", str(threads), sizes, str(repeats)])
    for config in configs:
        for threads in args.threads:
            step = _run_worker(["step", str(threads), config, str(warmup), str(steps), args.adam])
            peak = report["matmul"][str(threads)]["gflops"]
            step["fraction_of_matmul"] = step["achieved_gflops"] / peak
            step["meets_target"] = step["fraction_of_matmul"] >= report["target_fraction_of_matmul"]
            report["steps"].append(step)
    layout_config = "quick" if args.quick else "a"
    report["adam"] = [_run_worker(["adam", str(threads), layout_config, "3"]) for threads in args.threads]
    if args.layouts:
        report["layouts"] = [
            _run_worker(["layouts", str(threads), layout_config, "2" if args.quick else "3"])
            for threads in args.threads
        ]
    print(json.dumps(report, indent=2))


def sparse_specs(
    features: list[int],
    activations: list[str],
    actives: list[float],
    decodes: list[str],
    optimizers: list[str],
    precisions: list[str],
) -> list[dict]:
    """The --device cuda grid, the most telling rows first: per d_features and precision, per active
    share, per activation, decode x optimizer (bf16: dense decode only, the sparse decode runs
    dense for non-fp32 dtypes by design)."""
    return [
        {"d_features": f, "activation": act, "active": a, "decode": d, "optimizer": o, "precision": p}
        for f in features
        for p in precisions
        for a in actives
        for act in activations
        for d in (decodes if p == "fp32" else ["dense"])
        for o in optimizers
    ]


def _emit(row: dict, out: str | None) -> None:
    """One row to stderr and, with --out, appended to that file at once (a timeout keeps it)."""
    print(json.dumps(row), file=sys.stderr, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def run_in_process(
    specs: list[dict],
    device: str,
    steps: int,
    threads: int = 1,
    out: str | None = None,
    deadline: float | None = None,
    shape: tuple[int, int, int] = SPARSE_SHAPE,
    dead_coefficient: float = 1e-5,
    bandwidth: float | None = None,
    native_kernel: str = "auto",
) -> list[dict]:
    """Each spec's step in this process, in order (CUDA init once); everything freed between
    rows; a failing row (OOM, deferred unavailable) records {"error": ...} and the run goes on;
    past `deadline` (time.monotonic()) the remaining rows are skipped with a note."""
    import gc

    import torch

    rows = []
    for spec in specs:
        if deadline is not None and time.monotonic() > deadline:
            row = {**spec, "device": device, "skipped": "time limit (--max-seconds) reached"}
        else:
            try:
                row = worker_sparse(
                    threads, spec["d_features"], spec["activation"], spec["active"], spec["decode"], steps,
                    device, spec["precision"], spec["optimizer"], shape, dead_coefficient, bandwidth, native_kernel,
                )  # fmt: skip
            except Exception as exc:
                row = {**spec, "device": device, "error": str(exc), "error_type": type(exc).__name__}
            gc.collect()
            if device.startswith("cuda") and torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        _emit(row, out)
        rows.append(row)
    return rows


def sparse_report(args: argparse.Namespace) -> dict:
    """Dense vs sparse step time and peak memory per (d_features, activation, active share, ...).
    cpu: one subprocess per step (peak RSS per row), dense and sparse paired in one row; cuda: the
    rows of `sparse_specs` in this process, one row each."""
    steps = args.steps or 3
    acts = args.activations
    deadline = time.monotonic() + args.max_seconds if args.max_seconds else None
    if args.device != "cpu":
        specs = sparse_specs(
            args.sparse_features, acts, args.active, ["dense", "sparse"], args.optimizer, args.precision
        )
        return {
            "sparse_decode": run_in_process(
                specs,
                args.device,
                steps,
                args.threads[0],
                args.out,
                deadline,
                dead_coefficient=args.dead_coefficient,
                bandwidth=args.bandwidth,
                native_kernel=args.native,
            )
        }
    rows = []
    specs = sparse_specs(args.sparse_features, acts, args.active, ["dense"], args.optimizer, args.precision)
    for spec in sorted(specs, key=lambda s: (s["d_features"], acts.index(s["activation"]), s["active"])):
        bandwidth = "default" if args.bandwidth is None else str(args.bandwidth)
        extra = [spec["precision"], spec["optimizer"], str(args.dead_coefficient), bandwidth, args.native]
        head = ["sparse", str(args.threads[0]), str(spec["d_features"]), spec["activation"], str(spec["active"])]
        decodes = ["dense", "sparse"] if spec["precision"] == "fp32" else ["dense"]
        pair = {decode: _run_worker([*head, decode, str(steps), *extra]) for decode in decodes}
        row = next((r for r in pair.values() if "error" in r), None)
        if row is not None:
            row = {**spec, "decode": " vs ".join(decodes), "error": row["error"]}
        elif "sparse" in pair:
            row = {**pair["sparse"], "decode": "sparse vs dense"}
            row["dense_seconds"], row["sparse_seconds"] = pair["dense"]["seconds_per_step"], row.pop("seconds_per_step")
            row["sparse_over_dense"] = row["sparse_seconds"] / row["dense_seconds"]
            row["dense_peak_rss_mib"], row["sparse_peak_rss_mib"] = pair["dense"]["peak_rss_mib"], row["peak_rss_mib"]
            del row["peak_rss_mib"], row["seconds_per_step_all"]
        else:
            row = pair["dense"]
        _emit(row, args.out)
        rows.append(row)
    return {"sparse_decode": rows}


if __name__ == "__main__":
    main()
