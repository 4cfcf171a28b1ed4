"""Read the reference CLT-Forge library's checkpoints (clt_weights.safetensors) as clt-forge checkpoints.

The folder, as its `CLT.save_model` writes it (key names from its source; the per-rank layout
is our documented assumption, docs/formats.md):

    clt_cfg.json              its config: model_name, d_in, d_latent, jumprelu_bandwidth,
                              cross_layer_decoders, ... (optional here)
    clt_weights.safetensors   W_enc [L, D, F], b_enc [L, F], log_threshold [L, F],
                              W_dec [P, F, D] and b_dec [P, D], one row per (source l, target
                              t >= l) pair in torch.triu_indices(L, L) order (source-major),
                              estimated_norm_scaling_factor_in [L], estimated_norm_scaling_factor_out [L]
                              (other buffers, e.g. feature_count, are ignored)
    or clt_weights_rank{r}.safetensors (also clt_weights.rank{r}, clt_weights_{r}), one per rank:
                              rank r's contiguous slice of the features (W_enc, b_enc,
                              log_threshold, W_dec along F), b_dec and the factors in every file;
                              the slices are concatenated in rank order.

A per-layer CLT (cross_layer_decoders false) stores W_dec [L, F, D] and b_dec [L, D]: it is
read as a CLT whose cross-layer decoders are zero. Its decode adds b_dec once per pair, so our
b_dec[t] is the sum of b_dec over the pairs with target t. Its normalisation multiplies:
x_norm = x * factor_in and y = decode / factor_out; ours divides, so in_scale = 1 / factor_in
and out_scale = 1 / factor_out. Hooks: the library reads `ln2.hook_normalized` and writes
`hook_mlp_out` (TransformerLens names, block-relative) unless clt_cfg.json names
feature_input_hook / feature_output_hook. `read_features` reads only some features (autointerp):
their W_enc columns and their rows of each pair block of W_dec.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from clt_forge.artifacts.feature_subset import read_chosen
from clt_forge.artifacts.foreign_common import ForeignHeader, block_hooks
from clt_forge.artifacts.tensor_file import TensorFile
from clt_forge.clt.model import pair_offsets
from clt_forge.errors import CLTError

__all__ = ["FORMAT", "detect", "read_features", "read_header", "read_weights"]

FORMAT = "clt-forge-reference/clt"
WEIGHTS = "clt_weights.safetensors"
CONFIG = "clt_cfg.json"
RANK_FILE = re.compile(r"clt_weights[._-](?:rank[._-]?)?(\d+)\.safetensors")
INPUT_HOOK, OUTPUT_HOOK = "ln2.hook_normalized", "hook_mlp_out"
FACTOR_IN, FACTOR_OUT = "estimated_norm_scaling_factor_in", "estimated_norm_scaling_factor_out"


def weight_files(folder: Path) -> list[Path]:
    """[clt_weights.safetensors], or the per-rank files in rank order (ranks 0..W-1 all present)."""
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    ranks = {int(m.group(1)): p for p in folder.glob("clt_weights*.safetensors") if (m := RANK_FILE.fullmatch(p.name))}
    missing = sorted(set(range(max(ranks, default=-1) + 1)) - set(ranks))
    if missing:
        raise CLTError(
            f"CLT-Forge checkpoint {folder}: the file of rank {missing[0]} is missing (have {sorted(ranks)})."
        )
    return [ranks[r] for r in sorted(ranks)]


def detect(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file() or any(RANK_FILE.fullmatch(p.name) for p in folder.glob("clt_weights*"))


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CLTError(f"{path}: not a JSON object ({exc}).") from exc


def shapes(path: Path) -> dict[str, list[int]]:
    with safe_open(path, "pt") as handle:
        return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118


def read_header(folder: Path) -> ForeignHeader:
    files = weight_files(folder)
    per_file = [shapes(path) for path in files]
    for path, found in zip(files, per_file, strict=True):
        absent = [
            k for k in ("W_enc", "b_enc", "log_threshold", "W_dec", "b_dec", FACTOR_IN, FACTOR_OUT) if k not in found
        ]
        if absent:
            raise CLTError(f"CLT-Forge checkpoint {path}: key {absent[0]} is missing.")
    n_layers, d_model, _ = per_file[0]["W_enc"]
    d_features = sum(found["W_enc"][2] for found in per_file)
    pairs = per_file[0]["W_dec"][0]
    if pairs not in (n_layers, n_layers * (n_layers + 1) // 2):
        raise CLTError(
            f"CLT-Forge checkpoint {files[0]}: W_dec has {pairs} rows; expected L(L+1)/2 = "
            f"{n_layers * (n_layers + 1) // 2} (cross-layer) or L = {n_layers} (per-layer) for L = {n_layers}."
        )
    config = read_config(folder)
    model = {"hf_name": config["model_name"]} if config.get("model_name") else {}
    hooks = block_hooks(
        n_layers, config.get("feature_input_hook", INPUT_HOOK), config.get("feature_output_hook", OUTPUT_HOOK)
    )
    cross_layer = pairs == n_layers * (n_layers + 1) // 2
    return ForeignHeader(
        format=FORMAT,
        n_layers=n_layers,
        d_model=d_model,
        d_features=d_features,
        bandwidth=float(config.get("jumprelu_bandwidth", 1.0)),
        model=model,
        hooks=hooks,
        imported={
            "format": FORMAT,
            "folder": str(folder.resolve()),
            "files": [p.name for p in files],
            "decoders": "cross-layer" if cross_layer else "per-layer (cross-layer decoders zero)",
        },
    )


def read_weights(folder: Path, header: ForeignHeader, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Our tensors (see foreign_common), float32 on `device`. Each rank file's feature slice is
    copied into place with plain reads (artifacts/tensor_file.py), a layer of W_enc or a pair's
    decoder block at a time, cast as it goes: loading holds the float32 CLT plus one such block."""
    L, D, F = header.n_layers, header.d_model, header.d_features
    offsets = pair_offsets(L)
    W_enc = torch.empty(L, D, F, device=device)
    b_enc = torch.empty(L, F, device=device)
    log_threshold = torch.empty(L, F, device=device)
    W_dec: torch.Tensor | None = None
    shared: dict[str, torch.Tensor] = {}
    lo = 0
    for path in weight_files(folder):
        weights = TensorFile(path)
        hi = lo + weights.shape("W_enc")[2]
        for start, stop, rows in weights.chunks("W_enc"):  # [layers, D, f]
            W_enc[start:stop, :, lo:hi] = rows
        b_enc[:, lo:hi] = weights.read("b_enc")
        log_threshold[:, lo:hi] = weights.read("log_threshold")
        per_layer = weights.shape("W_dec")[0] == L and L > 1  # only the (l, l) pairs exist
        if W_dec is None:
            W_dec = (torch.zeros if per_layer else torch.empty)(F, offsets[-1], D, device=device)
            shared = {key: weights.read(key).float().to(device) for key in ("b_dec", FACTOR_IN, FACTOR_OUT)}
        for start, stop, rows in weights.chunks("W_dec"):  # [pairs (or layers), f, D]
            if per_layer:
                for layer in range(start, stop):
                    W_dec[lo:hi, offsets[layer]] = rows[layer - start]
            else:  # triu order is our packed source-major order
                W_dec[lo:hi, start:stop] = rows.transpose(0, 1)
        lo = hi
    assert W_dec is not None  # weight_files lists at least one file
    if shared["b_dec"].shape[0] == L and L > 1:
        b_dec = shared["b_dec"]
    else:  # its decode adds b_dec once per pair: ours is the sum over the pairs of each target
        targets = torch.triu_indices(L, L)[1].to(device)
        b_dec = torch.zeros(L, D, device=device).index_add_(0, targets, shared["b_dec"])
    return {
        "W_enc": W_enc,
        "b_enc": b_enc,
        "log_threshold": log_threshold,
        "W_dec": W_dec,
        "b_dec": b_dec,
        "norm.in_scale": 1.0 / shared[FACTOR_IN],
        "norm.out_scale": 1.0 / shared[FACTOR_OUT],
    }


def read_features(
    folder: Path, header: ForeignHeader, wanted: list[list[int]]
) -> dict[str, list[torch.Tensor] | torch.Tensor]:
    """Each layer's `wanted` features (ascending) as artifacts/feature_subset.py lays them out:
    their W_enc columns, and their rows of each of their source layer's pair blocks of W_dec
    [P, f, D] (a per-layer CLT: the (l, l) block, the other targets zero); per rank file."""
    L, D = header.n_layers, header.d_model
    offsets = pair_offsets(L)
    handles = [TensorFile(path) for path in weight_files(folder)]
    bounds, lo = [], 0
    for weights in handles:
        bounds.append((lo, lo + weights.shape("W_enc")[2]))
        lo = bounds[-1][1]
    per_layer = handles[0].shape("W_dec")[0] == L and L > 1

    def decoder(weights: TensorFile, layer: int, local: list[int]) -> torch.Tensor:
        targets, width = L - layer, weights.shape("W_dec")[1]
        if per_layer:
            rows = torch.zeros(len(local), targets, D)
            rows[:, 0] = weights.take("W_dec", [layer * width + f for f in local], lead=2)
            return rows
        # pair offsets[layer] + t is (source layer, target layer + t)
        index = [(offsets[layer] + t) * width + f for f in local for t in range(targets)]
        return weights.take("W_dec", index, lead=2).float().view(len(local), targets, D)

    factors = {key: handles[0].read(key).float() for key in (FACTOR_IN, FACTOR_OUT)}
    return read_chosen(handles, bounds, wanted, D, decoder) | {
        "norm.in_scale": 1.0 / factors[FACTOR_IN],
        "norm.out_scale": 1.0 / factors[FACTOR_OUT],
    }
