"""Peak memory while loading an imported circuit-tracer-format CLT, against the loaded model's size.

    .venv/bin/python benchmarks/foreign_memory.py [--format circuit-tracer|reference|ours] [--layers 6]
        [--d-model 512] [--features 8192] [--dtype float32|bfloat16] [--chunk-mib 64]
        [--modes autointerp,load,convert,autointerp-whole] [--autointerp-share 100]

Writes a random CLT to a temporary folder in circuit-tracer's on-disk format (config.yaml,
W_enc_{l} / W_dec_{l}.safetensors), the reference CLT-Forge library's (clt_weights.safetensors)
or ours (`clt train`'s clt.safetensors, float32), then measures each mode in a fresh
process: `load` is `load_checkpoint` (what `clt train finetune.from=` holds), `convert` is
`to_circuit_tracer` (the transcoder `clt attribute` hands circuit-tracer), `autointerp` is
`load_features` for every `--autointerp-share`-th feature (default 100: 1%; what `clt
autointerp` holds: their encoders and decoder rows) and `autointerp-whole` what autointerp held
before (`load_checkpoint`, then those features' encoder columns and decoder rows). Peak
memory is the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs
just before the load; ru_maxrss where that is not available) minus its resident size before
the load, in MB, and as a ratio to the float32 model's bytes. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def model_bytes(n_layers: int, d_model: int, d_features: int) -> int:
    """The float32 CLT's size: W_enc, b_enc, log_threshold, the L(L+1)/2 decoder blocks, b_dec."""
    pairs = n_layers * (n_layers + 1) // 2
    return 4 * (
        n_layers * d_model * d_features + 2 * n_layers * d_features + pairs * d_features * d_model + n_layers * d_model
    )


def write_circuit_tracer(folder: Path, n_layers: int, d_model: int, d_features: int, dtype: torch.dtype) -> Path:
    """A random JumpReLU CLT in circuit-tracer's on-disk format, written one layer at a time."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for layer in range(n_layers):
        encoder = {
            f"W_enc_{layer}": torch.randn(d_features, d_model, generator=generator).mul_(d_model**-0.5).to(dtype),
            f"b_enc_{layer}": torch.zeros(d_features, dtype=dtype),
            f"b_dec_{layer}": torch.zeros(d_model, dtype=dtype),
            f"threshold_{layer}": torch.full((d_features,), 0.1, dtype=dtype),
        }
        save_file(encoder, folder / f"W_enc_{layer}.safetensors")
        del encoder
        decoder = torch.randn(d_features, n_layers - layer, d_model, generator=generator).mul_(0.01).to(dtype)
        save_file({f"W_dec_{layer}": decoder}, folder / f"W_dec_{layer}.safetensors")
        del decoder
    (folder / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"
    )
    return folder


def write_reference(folder: Path, n_layers: int, d_model: int, d_features: int, dtype: torch.dtype) -> Path:
    """A random CLT in the reference CLT-Forge library's layout (clt_weights.safetensors)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    pairs = n_layers * (n_layers + 1) // 2
    tensors = {
        "W_enc": torch.randn(n_layers, d_model, d_features).mul_(d_model**-0.5).to(dtype),
        "b_enc": torch.zeros(n_layers, d_features, dtype=dtype),
        "log_threshold": torch.full((n_layers, d_features), -2.0, dtype=dtype),
        "W_dec": torch.randn(pairs, d_features, d_model).mul_(0.01).to(dtype),
        "b_dec": torch.zeros(pairs, d_model, dtype=dtype),
        "estimated_norm_scaling_factor_in": torch.ones(n_layers),
        "estimated_norm_scaling_factor_out": torch.ones(n_layers),
    }
    save_file(tensors, folder / "clt_weights.safetensors")
    return folder


def write_ours(folder: Path, n_layers: int, d_model: int, d_features: int, dtype: torch.dtype) -> Path:
    """A random CLT as `clt train` writes it (clt.safetensors + config.json; always float32)."""
    from clt_forge.artifacts.checkpoint import CheckpointInfo, save_checkpoint
    from clt_forge.artifacts.normalization import Normalization
    from clt_forge.clt.model import CrossLayerTranscoder

    clt = CrossLayerTranscoder(n_layers, d_model, d_features, init=False)
    with torch.no_grad():
        for param in clt.parameters():
            param.normal_(0, 0.01)
    norm = Normalization(torch.ones(n_layers), torch.ones(n_layers))
    return save_checkpoint(folder, clt, norm, CheckpointInfo(n_layers, d_model, d_features, 1.0, {}, {}))


WRITERS = {"circuit-tracer": write_circuit_tracer, "reference": write_reference, "ours": write_ours}


def status_mb(field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) // 1024 if found else None


def can_reset_peak() -> bool:
    """Whether this kernel resets VmHWM on request (Linux: "5" > /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return status_mb("VmHWM") is not None


def whole_autointerp(folder: Path, chosen: list[tuple[int, int]]) -> object:
    """What `clt autointerp` held before it read only its features: the whole CLT, and the chosen
    features' encoder columns and decoder rows taken from it."""
    from clt_forge.artifacts.checkpoint import load_checkpoint

    clt, norm, _ = load_checkpoint(folder)
    held = []
    with torch.no_grad():
        for layer in range(clt.n_layers):
            cols = torch.tensor([f for lay, f in chosen if lay == layer], dtype=torch.int64)
            held += [clt.W_enc[layer][:, cols].T.contiguous(), clt.decoder(layer)[cols].clone()]
    return clt, norm, held


def child(modes: list[str], folder: Path, chunk_mib: int, share: int = 100) -> dict[str, dict[str, float]]:
    """In this (fresh) process: load `folder` the way each mode does, one after the other (each
    result freed before the next), and report each one's memory."""
    import gc

    from clt_forge.artifacts import tensor_file
    from clt_forge.artifacts.checkpoint import load_checkpoint, load_features, read_info
    from clt_forge.attribution.convert import to_circuit_tracer
    from clt_forge.autointerp.runner import select_features

    tensor_file.CHUNK_BYTES = chunk_mib << 20
    info = read_info(folder)  # headers only; imports done
    chosen = select_features(info.n_layers, info.d_features, None, 0, share)  # every share-th feature
    load = {
        "load": lambda: load_checkpoint(folder),
        "convert": lambda: to_circuit_tracer(folder),
        "autointerp": lambda: load_features(folder, chosen),
        "autointerp-whole": lambda: whole_autointerp(folder, chosen),
    }
    found = {}
    for mode in modes:
        gc.collect()
        before = status_mb("VmRSS") or 0
        resets = can_reset_peak()  # VmHWM := VmRSS; else ru_maxrss (only the first mode is then exact)
        loaded = load[mode]()
        peak = status_mb("VmHWM") if resets else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        del loaded
        found[mode] = {
            "rss_before_mb": float(before),
            "peak_mb": float(peak or 0),
            "growth_mb": float((peak or 0) - before),
        }
    return found


def measure(modes: list[str], folder: Path, chunk_mib: int = 64, share: int = 100) -> dict[str, dict[str, float]]:
    """`child` in a fresh Python process (one thread), so nothing earlier counts in its peaks; one
    process per mode where the peak cannot be reset. Modes share the process in the order given,
    and a mode can reuse memory an earlier one freed to malloc (autointerp measured after the
    others read 0.002 against 0.025 first): the one that must be exact goes first."""
    groups = [modes] if can_reset_peak() else [[mode] for mode in modes]
    found: dict[str, dict[str, float]] = {}
    for group in groups:
        command = [sys.executable, __file__, "--child", ",".join(group), "--folder", str(folder)]
        done = subprocess.run(
            [*command, "--chunk-mib", str(chunk_mib), "--autointerp-share", str(share)],
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        found.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--features", type=int, default=8192)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--chunk-mib", type=int, default=64)
    parser.add_argument("--modes", default="autointerp,load,convert,autointerp-whole")
    parser.add_argument("--autointerp-share", type=int, default=100, help="autointerp modes: every N-th feature")
    parser.add_argument("--format", choices=list(WRITERS), default="circuit-tracer")
    parser.add_argument("--child", help="(internal) the modes to measure in this process")
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child.split(","), Path(args.folder), args.chunk_mib, args.autointerp_share)))
        return
    size = model_bytes(args.layers, args.d_model, args.features)
    with tempfile.TemporaryDirectory(prefix="clt-foreign-memory-") as scratch:
        write = WRITERS[args.format]
        folder = write(Path(scratch) / "clt", args.layers, args.d_model, args.features, getattr(torch, args.dtype))
        file_mb = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        found = measure(args.modes.split(","), folder, args.chunk_mib, args.autointerp_share)
        rows = {
            mode: {**row, "growth_over_model": round(row["growth_mb"] * 2**20 / size, 3)} for mode, row in found.items()
        }
    shape = {
        "format": args.format,
        "n_layers": args.layers,
        "d_model": args.d_model,
        "d_features": args.features,
        "dtype": args.dtype,
    }
    result = {**shape, "model_mb": round(size / 2**20, 1), "files_mb": round(file_mb, 1), "chunk_mib": args.chunk_mib}
    result["autointerp_share"] = args.autointerp_share
    print(json.dumps({**result, **rows}, indent=1))


if __name__ == "__main__":
    main()
