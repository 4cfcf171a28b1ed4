"""Sharding benchmark: what a rank holds, how long a step takes and what it sends, per sharding mode.

Spawns W processes (torch.multiprocessing, gloo, 1 thread each) that build the runner's CLT for
sharding=single (W = 1) and feature / ddp / fsdp (W = 2) and run `CLTTrainingRunner.train_step`
on synthetic batches of the same global size, then prints one JSON object with:
  - modes: per rank the parameter, gradient and Adam-state bytes held (FSDP: the local shards of
    its DTensors), peak RSS and the median step time after warm-up; and the bytes communicated
    per step, counted at the collective calls (torch.distributed's and DTensor's functional
    collectives wrapped in Python; FSDP2 calls dist.all_gather_single / reduce_scatter_single from
    Python; DDP reduces in C++, so a comm hook counts its buckets) next to the count expected
    from the shapes;
  - data: how feature-sharded ranks should get the same batch: seconds per batch to read and
    decode one from a cached dataset (1 reader; 2 concurrent readers of the same chunks, what
    sharding=feature does) vs a gloo broadcast of mlp_in + mlp_out (float32 [B, L, D]);
  - llama_1b: the per-GPU memory of a Llama-3.2-1B CLT at expansion 48 under 8-way feature
    sharding (docs/performance.md), from the shapes and the tensors autograd keeps for backward.

    .venv/bin/python benchmarks/sharding.py --dataset /tmp/acts_default   # ~5 minutes on 2 shared cores
    .venv/bin/python benchmarks/sharding.py --quick                        # smoke run (~2 minutes)

Without --dataset a small one of the tiny model is written first (`clt cache model=tiny`).
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import gc
import inspect
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 2**30
WATCHDOG_S = 300


# -- counting the bytes collectives move ----------------------------------------------------------
def _nbytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


# The whole buffer a call moves (a gather's output, a reduce-scatter's input), by argument name.
DIST_SIZES = {
    "all_reduce": lambda a: _nbytes(a["tensor"]),
    "broadcast": lambda a: _nbytes(a["tensor"]),
    "all_gather": lambda a: sum(_nbytes(t) for t in a["tensor_list"]),
    "all_gather_into_tensor": lambda a: _nbytes(a["output_tensor"]),
    "all_gather_single": lambda a: _nbytes(a["output_tensor"]),
    "reduce_scatter_tensor": lambda a: _nbytes(a["input"]),
    "reduce_scatter_single": lambda a: _nbytes(a["input"]),
}
FUNCOL_SIZES = {  # torch.distributed._functional_collectives, what DTensor redistributions call
    "all_reduce": lambda a: _nbytes(a["self"]),
    "all_gather_tensor": lambda a: _nbytes(a["self"]) * dist.get_world_size(),
    "reduce_scatter_tensor": lambda a: _nbytes(a["self"]),
}


class CommCounter:
    """Calls and bytes per collective kind; a collective calling another one counts once."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        self.originals: dict[str, Any] = {}
        self.inside = threading.local()

    def add(self, kind: str, nbytes: int) -> None:
        entry = self.counts.setdefault(kind, [0, 0])
        entry[0] += 1
        entry[1] += nbytes

    def wrap(self, module: Any, prefix: str, sizes: dict[str, Any]) -> None:
        for name in sizes:
            original = getattr(module, name)
            self.originals[prefix + name] = original
            signature = inspect.signature(original)

            def counted(*args: Any, _f=original, _sig=signature, _kind=prefix + name, _size=sizes[name], **kwargs: Any):
                depth = getattr(self.inside, "depth", 0)
                if depth == 0:
                    self.add(_kind, _size(_sig.bind(*args, **kwargs).arguments))
                self.inside.depth = depth + 1
                try:
                    return _f(*args, **kwargs)
                finally:
                    self.inside.depth = depth

            setattr(module, name, functools.wraps(original)(counted))

    def install(self) -> None:
        import torch.distributed._functional_collectives as funcol
        import torch.distributed.distributed_c10d as c10d

        for module in (dist, c10d):
            self.wrap(module, "", DIST_SIZES)
        self.wrap(funcol, "funcol.", FUNCOL_SIZES)

    def per_step(self, steps: int) -> dict[str, dict[str, float]]:
        return {k: {"calls": c / steps, "bytes": b / steps} for k, (c, b) in sorted(self.counts.items())}


def ddp_count_hook(counter: CommCounter, all_reduce: Any):
    """DDP's default all-reduce (mean) as a comm hook that counts each gradient bucket."""

    def hook(state, bucket):  # no annotations: DDP accepts none or its own classes, not strings
        buffer = bucket.buffer()
        counter.add("ddp_bucket_all_reduce", _nbytes(buffer))
        buffer.div_(dist.get_world_size())
        future = all_reduce(buffer, async_op=True).get_future()
        return future.then(lambda f: f.value()[0])

    return hook


def expected_comm(mode: str, n_layers: int, d_model: int, d_features: int, batch: int, n_params: int) -> dict:
    """Bytes per step and rank by collective kind, from the shapes (fp32 tensors; `fired` is uint8)."""
    if mode == "single":
        return {}
    if mode == "feature":
        # partial reconstruction [B, L, D] (forward), sparsity + dead terms, grad-norm square (f64), L0
        return {"all_reduce": batch * n_layers * d_model * 4 + 2 * 4 + 8 + 4}
    # logged loss terms (4 scalars), which features fired on any rank ([L, F] uint8, max), L0
    expected = {"all_reduce": 4 * 4 + n_layers * d_features + 4}
    if mode == "ddp":
        expected["ddp_bucket_all_reduce"] = 4 * n_params  # every gradient once
    else:
        expected["all_gather_single"] = 4 * n_params  # parameters, forward (the root keeps them for backward)
        expected["reduce_scatter_single"] = 4 * n_params  # gradients
        expected["funcol.all_reduce"] = 4 * 5  # the 5 parameters' gradient norms (DTensor), for the global norm
    return expected


# -- one mode's training steps on W ranks ----------------------------------------------------------
def train_config(mode: str, shape: dict[str, int]) -> Any:
    from clt_forge.config.compose import load_config

    return load_config(
        "train",
        "model=tiny",
        f"model.n_layers={shape['n_layers']}",
        f"model.d_model={shape['d_model']}",
        f"clt.d_features={shape['d_features']}",
        f"batch_size={shape['batch']}",
        f"sharding={mode}",
        "device=cpu",
        "threads=1",
    )


def local_bytes(tensors: Any) -> int:
    return sum(_nbytes(t) for t in tensors if isinstance(t, torch.Tensor))


def mode_worker(rank: int, world: int, port: int, mode: str, shape: dict, steps: int, warmup: int, queue: Any) -> None:
    if world > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
        )
    torch.set_num_threads(1)
    counter = CommCounter()
    counter.install()
    # start_parallel via the runner: importing clt_forge.distributed.parallel first is a circular import
    from clt_forge.training.runner import CLTTrainingRunner, start_parallel

    runner = CLTTrainingRunner(train_config(mode, shape))
    runner.parallel = start_parallel(runner.cfg)
    runner.total_steps = 1000  # schedules as early in a long run
    runner.build_model()
    generator = torch.Generator().manual_seed(0)
    size = (shape["batch"], shape["n_layers"], shape["d_model"])
    batches = [(torch.randn(size, generator=generator), torch.randn(size, generator=generator)) for _ in range(2)]
    share = slice(rank * shape["batch"] // world, (rank + 1) * shape["batch"] // world)
    if mode in ("ddp", "fsdp"):  # data parallel: a disjoint share of the global batch
        batches = [(x[share].clone(), y[share].clone()) for x, y in batches]
    runner.init_encoder_bias(batches[0][0])
    runner.prepare()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        assert isinstance(runner.module, DistributedDataParallel)
        runner.module.register_comm_hook(None, ddp_count_hook(counter, counter.originals["all_reduce"]))
    times, cpu_times = [], []
    for step in range(warmup + steps):
        if step == warmup:
            counter.counts.clear()
        x, y = batches[step % 2]
        start, cpu = time.perf_counter(), time.process_time()
        runner.train_step(step, x, y)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    clt, optimizer = runner.clt, runner.optimizer
    queue.put(
        {
            "rank": rank,
            "features": [runner.features.start, runner.features.stop],
            "param_bytes": local_bytes(clt.parameters()),
            "grad_bytes": local_bytes(p.grad for p in clt.parameters()),
            "adam_bytes": local_bytes(t for state in optimizer.state.values() for t in state.values()),
            "n_params_global": sum(p.numel() for p in clt.parameters()),  # DTensor: the full shape
            "step_s": statistics.median(times[warmup:]),
            "step_cpu_s": statistics.median(cpu_times[warmup:]),  # this process's CPU time: less load-sensitive
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB,
            "comm": counter.per_step(steps),
        }
    )
    # DDP's reducer holds the process group: freed after destroy_process_group, its gloo threads can
    # deadlock (a finished work waits for the GIL that ~ProcessGroupGloo holds while joining them)
    del runner.module
    gc.collect()
    runner.parallel.close()


def watched(rank: int, fn: Any, *args: Any) -> None:
    """A rank that is stuck for WATCHDOG_S prints where and exits, so a run fails instead of hanging."""
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    fn(rank, *args)
    faulthandler.cancel_dump_traceback_later()


def spawn(fn: Any, world: int, *args: Any) -> list[dict]:
    """Run fn(rank, world, port, *args, queue) on `world` processes; their reports by rank."""
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(watched, args=(fn, world, free_port(), *args, queue), nprocs=world, start_method="spawn")
    reports = [queue.get() for _ in range(world)]
    return sorted(reports, key=lambda r: r["rank"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_mode(mode: str, world: int, shape: dict, steps: int, warmup: int) -> dict:
    ranks = spawn(mode_worker, world, mode, shape, steps, warmup)
    n_params = ranks[0]["n_params_global"]
    if mode == "feature":  # every rank holds its slice of the features and the whole b_dec
        n_params = sum(r["n_params_global"] for r in ranks) - (world - 1) * shape["n_layers"] * shape["d_model"]
    expected = expected_comm(mode, shape["n_layers"], shape["d_model"], shape["d_features"], shape["batch"], n_params)
    counted = [{kind: c["bytes"] for kind, c in r["comm"].items()} for r in ranks]
    held = [r["param_bytes"] + r["adam_bytes"] for r in ranks]
    return {
        "world": world,
        "params": n_params,
        "param_plus_adam_bytes_per_rank": held,
        "step_s": max(r["step_s"] for r in ranks),  # the slowest rank's median
        "step_cpu_s": max(r["step_cpu_s"] for r in ranks),
        "comm_bytes_per_step_counted": sum(counted[0].values()),
        "comm_bytes_per_step_expected": sum(expected.values()),
        "comm_expected_by_kind": expected,
        "comm_matches": all(c == expected for c in counted),  # every rank, every kind of collective
        "ranks": ranks,
    }


# -- data: every rank reads the same chunks, or rank 0 reads and broadcasts ------------------------
def read_batches(dataset: str, batch: int, n: int) -> tuple[float, float, Any]:
    """(wall s, CPU s) per batch reading n batches as every feature-sharded rank does (data rank 0 of 1:
    the same chunks, the same batches), timed from the start over many chunk groups: the steady rate
    at which the reader's threads read, verify and decode. Also returns the last batch."""
    from clt_forge.artifacts.reader import ActivationReader

    reader = ActivationReader(dataset, batch, seed=0, rank=0, world_size=1)
    wall, cpu = time.perf_counter(), time.process_time()
    batches = iter(reader)
    for _ in range(n):
        last = next(batches)
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n, last


def data_worker(rank: int, world: int, port: int, dataset: str, batch: int, n: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    report: dict[str, Any] = {"rank": rank}
    if rank == 0:  # one reader alone (what rank 0 does before a broadcast)
        report["alone_s"], report["alone_cpu_s"], _ = read_batches(dataset, batch, n)
    dist.barrier()
    report["read_s"], report["read_cpu_s"], last = read_batches(dataset, batch, n)  # every rank at once
    dist.barrier()
    tensors = [last.mlp_in, last.mlp_out] if rank == 0 else [torch.empty_like(last.mlp_in) for _ in range(2)]
    times, cpu_times = [], []
    for _ in range(min(n, 10) + 1):
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        for tensor in tensors:
            dist.broadcast(tensor, src=0)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    report["broadcast_s"] = statistics.median(times[1:])
    report["broadcast_cpu_s"] = statistics.median(cpu_times[1:])
    report["broadcast_bytes"] = sum(_nbytes(t) for t in tensors)
    queue.put(report)
    dist.destroy_process_group()


def data_costs(dataset: str, batch: int, n: int) -> dict:
    from clt_forge.artifacts.activations import read_manifest
    from clt_forge.artifacts.reader import ActivationReader

    manifest = read_manifest(Path(dataset))
    ranks = spawn(data_worker, 2, dataset, batch, n)
    every_rank_reads = max(r["read_s"] for r in ranks)
    read_once_broadcast = ranks[0]["alone_s"] + ranks[0]["broadcast_s"]
    return {
        "dataset": dataset,
        "model": manifest.model,
        "quant": manifest.quant["scheme"] if isinstance(manifest.quant, dict) else str(manifest.quant),
        "shape": [batch, manifest.n_layers, manifest.d_model],
        "batches_read": n,
        "decode_workers_per_reader": ActivationReader(dataset, batch).workers,
        "read_s_per_batch_1_reader": ranks[0]["alone_s"],
        "read_cpu_s_per_batch_1_reader": ranks[0]["alone_cpu_s"],
        "read_s_per_batch_2_readers": [r["read_s"] for r in ranks],
        "read_cpu_s_per_batch_2_readers": [r["read_cpu_s"] for r in ranks],
        "broadcast_s_per_batch": ranks[0]["broadcast_s"],
        "broadcast_cpu_s_per_batch": [r["broadcast_cpu_s"] for r in ranks],
        "broadcast_bytes_per_batch": ranks[0]["broadcast_bytes"],
        "per_step_every_rank_reads_s": every_rank_reads,
        "per_step_read_once_and_broadcast_s": read_once_broadcast,
        "cheaper": "every rank reads" if every_rank_reads <= read_once_broadcast else "read once and broadcast",
        # CPU seconds per step summed over the 2 ranks: what the two ways take from the training's cores
        "cpu_s_per_step_every_rank_reads": sum(r["read_cpu_s"] for r in ranks),
        "cpu_s_per_step_read_once_and_broadcast": ranks[0]["alone_cpu_s"] + sum(r["broadcast_cpu_s"] for r in ranks),
    }


def make_tiny_dataset(folder: Path) -> str:
    clt = Path(sys.executable).with_name("clt")
    command = [str(clt), "cache", "model=tiny", f"out={folder}", "tokens=20000", "held_out_tokens=0"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return str(folder)


# -- Llama-3.2-1B at expansion 48, 8-way feature sharding: per-GPU memory --------------------------
def saved_for_backward(
    autocast: bool, batch: int = 24, n_layers: int = 3, d_model: int = 20, d_features: int = 36
) -> dict:
    """Bytes per [B, L, F_rank] and per [B, L, D] element of what one rank's forward + loss keep for
    backward (beyond the parameters and the batch), measured at a small shape: bf16 parameters
    (autocast=False) or fp32 parameters under bf16 autocast (`clt train precision=bf16`)."""
    from clt_forge.clt.loss import clt_loss
    from clt_forge.clt.model import CrossLayerTranscoder

    clt = CrossLayerTranscoder(n_layers, d_model, d_features, dtype=torch.float32 if autocast else torch.bfloat16)
    x, y = (torch.randn(batch, n_layers, d_model, dtype=clt.W_enc.dtype) for _ in range(2))
    skip = {t.untyped_storage().data_ptr() for t in [*clt.parameters(), x, y]}
    kept: dict[int, tuple[int, int]] = {}  # storage -> (elements, bytes)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = (storage.nbytes() // tensor.element_size(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = clt(x)
            loss = clt_loss(out, y, out.decoder_norms, clt.jumprelu_threshold(), 1.0, 1.0, 1e-5)
        loss.total.backward()
    blf, bld = batch * n_layers * d_features, batch * n_layers * d_model
    w_dec = clt.W_dec.numel()
    return {
        "BLF_tensors": sum(1 for n, _ in kept.values() if n == blf),
        "BLF_bytes": sum(b for n, b in kept.values() if n == blf) / blf,
        "BLD_tensors": sum(1 for n, _ in kept.values() if n == bld),
        "BLD_bytes": sum(b for n, b in kept.values() if n == bld) / bld,
        "W_dec_copy_bytes": sum(b for n, b in kept.values() if n == w_dec) / w_dec,  # autocast's bf16 W_dec
    }


def llama_table(world: int = 8, batch: int = 512, usable_gib: float = 78.0) -> dict:
    """Per-GPU memory of a CLT on Llama-3.2-1B (16 layers, d_model 2048) at expansion 48 under
    W-way feature sharding; `usable_gib`: what an 80 GB card (79.6 GiB) leaves after the CUDA context."""
    n_layers, d_model = 16, 2048
    d_features = 48 * d_model
    pairs = n_layers * (n_layers + 1) // 2  # a feature of layer l writes to every layer >= l
    counts = {
        "W_enc": n_layers * d_model * d_features,
        "b_enc": n_layers * d_features,
        "log_threshold": n_layers * d_features,
        "W_dec": d_features * pairs * d_model,
        "b_dec": n_layers * d_model,
    }
    total = sum(counts.values())
    bld = batch * n_layers * d_model
    census = {"bf16": saved_for_backward(autocast=False), "autocast": saved_for_backward(autocast=True)}
    plans = {  # (bytes per parameter and per gradient, Adam's two moments, census, bf16 W_dec gradient buffer)
        "bf16 params + grads, fp32 Adam moments": (2, 8, census["bf16"], 0),
        "bf16 params + grads, bf16 Adam moments": (2, 4, census["bf16"], 0),
        "fp32 params + grads + moments, bf16 autocast (clt train precision=bf16)": (4, 8, census["autocast"], 2),
    }

    def per_gpu(world: int, param: int, moments: int, saved: dict, grad_buffer: int) -> dict:
        per_rank = (total - counts["b_dec"]) / world + counts["b_dec"]  # b_dec replicated
        blf = batch * n_layers * d_features / world
        w_dec = counts["W_dec"] / world
        element = saved["BLF_bytes"] / saved["BLF_tensors"]  # a typical [B, L, F] tensor's bytes per element
        parts = {
            "parameters": param * per_rank,
            "gradients": param * per_rank,
            "adam_moments": moments * per_rank,
            "bf16 copy of W_dec kept for backward (autocast)": saved["W_dec_copy_bytes"] * w_dec,
            "bf16 W_dec gradient buffer (GradBuffer, autocast)": grad_buffer * w_dec,
            "batch (inputs + targets [B, L, D], fp32 as read)": 2 * bld * 4,
            "saved for backward": saved["BLF_bytes"] * blf + saved["BLD_bytes"] * bld,
            "backward transients (~3 [B, L, F/W] gradients; estimate)": 3 * blf * element,
            "reconstruction + all-reduce buffer (2 [B, L, D])": 2 * bld * 4,
        }
        gib = {k: v / GiB for k, v in parts.items() if v}
        gib["total"] = sum(gib.values())
        gib["fits_80GB"] = gib["total"] <= usable_gib
        return gib

    table = {}
    for name, plan in plans.items():
        table[name] = per_gpu(world, *plan)
        table[name]["fewest_gpus_that_fit"] = next(w for w in range(1, 65) if per_gpu(w, *plan)["fits_80GB"])
    return {
        "n_layers": n_layers,
        "d_model": d_model,
        "d_features": d_features,
        "params": counts,
        "params_total": total,
        "paper_claim": "~27B (eq. 4)",
        "decoder_share": counts["W_dec"] / total,
        "world": world,
        "params_per_rank": (total - counts["b_dec"]) / world + counts["b_dec"],
        "micro_batch": batch,
        "usable_gib": usable_gib,
        "saved_for_backward_census": census,
        "per_gpu_gib": table,
        # bf16 bytes each rank puts into collectives per step (the runner's per-step scalars left out)
        "comm_bytes_per_step": {"feature": bld * 2, "ddp": total * 2, "fsdp": 2 * total * 2},
    }


# -- main ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--d-features", type=int, default=384)
    parser.add_argument("--batch", type=int, default=256, help="global batch (tokens per step)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode, after --warmup")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dataset", help="a cached activation dataset for the read-vs-broadcast part")
    parser.add_argument("--read-tokens", type=int, default=16384, help="tokens each reader reads (data part)")
    parser.add_argument("--quick", action="store_true", help="small shapes, few steps (a smoke run)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned ranks inherit it
    if args.quick:
        args.layers, args.d_model, args.d_features, args.batch = 4, 64, 128, 128
        args.steps, args.warmup, args.read_tokens = 2, 1, 4096
    shape = {"n_layers": args.layers, "d_model": args.d_model, "d_features": args.d_features, "batch": args.batch}
    started, load = time.perf_counter(), os.getloadavg()[0]
    modes = {"single": run_mode("single", 1, shape, args.steps, args.warmup)}
    for mode in ("feature", "ddp", "fsdp"):
        modes[mode] = run_mode(mode, 2, shape, args.steps, args.warmup)
    single = modes["single"]["param_plus_adam_bytes_per_rank"][0]
    for report in modes.values():
        report["param_plus_adam_vs_single"] = [b / single for b in report["param_plus_adam_bytes_per_rank"]]
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or make_tiny_dataset(Path(tmp) / "acts")
        data = data_costs(dataset, args.batch, -(-args.read_tokens // args.batch))
    result = {
        "shape": shape,
        "threads_per_rank": 1,
        "backend": "gloo",
        "cpu": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_1min": [load, os.getloadavg()[0]],  # before, after: ~2 = both cores busy with others
        "modes": modes,
        "data": data,
        "llama_1b": llama_table(),
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
