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
feature_input_hook / feature_output_hook.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from clt_forge.artifacts.foreign_common import ForeignHeader, block_hooks
from clt_forge.errors import CLTError

__all__ = ["FORMAT", "detect", "read_header", "read_weights"]

FORMAT = "clt-forge-reference/clt"
WEIGHTS = "clt_weights.safetensors"
CONFIG = "clt_cfg.json"
RANK_FILE = re.compile(r"clt_weights[._-](?:rank[._-]?)?(\d+)\.safetensors")
INPUT_HOOK, OUTPUT_HOOK = "ln2.hook_normalized", "hook_mlp_out"
FACTOR_IN, FACTOR_OUT = "estimated_norm_scaling_factor_in", "estimated_norm_scaling_factor_out"
FEATURE_DIM = {"W_enc": 2, "b_enc": 1, "log_threshold": 1, "W_dec": 1}  # concatenated across rank files


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
    """Our tensors (see foreign_common), float32 on `device`."""
    parts: dict[str, list[torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        with safe_open(path, "pt", device=str(device)) as handle:
            for key in (*FEATURE_DIM, "b_dec", FACTOR_IN, FACTOR_OUT):
                if key in FEATURE_DIM:
                    parts.setdefault(key, []).append(handle.get_tensor(key).float())
                elif key not in shared:
                    shared[key] = handle.get_tensor(key).float()
    tensors = {key: torch.cat(pieces, dim=FEATURE_DIM[key]) for key, pieces in parts.items()}
    L, D, F = header.n_layers, header.d_model, header.d_features
    rows = tensors["W_dec"]  # [P or L, F, D]
    sources, targets = torch.triu_indices(L, L)
    if rows.shape[0] == L and L > 1:  # per-layer decoders: only the (l, l) pairs are non-zero
        diagonal = rows
        rows = rows.new_zeros(len(sources), F, D)
        rows[sources == targets] = diagonal
        b_dec = shared["b_dec"]
    else:
        b_dec = torch.zeros(L, D, device=rows.device).index_add_(0, targets.to(rows.device), shared["b_dec"])
    return {
        "W_enc": tensors["W_enc"].contiguous(),
        "b_enc": tensors["b_enc"].contiguous(),
        "log_threshold": tensors["log_threshold"].contiguous(),
        "W_dec": rows.permute(1, 0, 2).contiguous(),  # triu order is our packed source-major order
        "b_dec": b_dec,
        "norm.in_scale": 1.0 / shared[FACTOR_IN],
        "norm.out_scale": 1.0 / shared[FACTOR_OUT],
    }
