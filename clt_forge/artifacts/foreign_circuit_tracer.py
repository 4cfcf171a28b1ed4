"""Read circuit-tracer's on-disk CLT (what published CLTs use) as a clt-forge checkpoint.

The folder (circuit_tracer.transcoder.cross_layer_transcoder: `to_safetensors` / `load_clt`):

    config.yaml             model_kind: cross_layer_transcoder, feature_input_hook,
                            feature_output_hook, usually model_name (hub id of the model)
    W_enc_{l}.safetensors   W_enc_{l} [F, D], b_enc_{l} [F], b_dec_{l} [D], optional
                            threshold_{l} [F] (JumpReLU z = h * (h > threshold); absent: ReLU)
    W_dec_{l}.safetensors   W_dec_{l} [F, L - l, D] (targets l .. L-1)
    W_skip_{l}.safetensors  optional: W_skip_{l} [D, D], a skip connection y_l += x_l @ W_skip_{l}
                            (the key may also sit in W_enc_{l}.safetensors)

for l = 0 .. L-1. The weights are in raw model units, so the normalisation factors are 1.
Mapping to ours: W_enc[l] = W_enc_{l}^T, log_threshold[l] = log(threshold_{l}) (a ReLU CLT is
exactly JumpReLU with theta = 0, log_threshold = -inf: h * (h > 0) = ReLU(h)), W_dec's source-l
block = W_dec_{l}, W_skip[l] = W_skip_{l} (every layer or none). circuit-tracer's CLT holds a
skip connection as W_skip [L, D, D] (inputs @ W_skip[l]), but its `load_clt` reads no skip from
disk; the per-layer W_skip_{l} files are the convention of converted skip CLTs (e.g. of Gemma
Scope 2's affine_skip_connection) and what `clt export` writes. Each layer's
matrices are read a chunk of rows at a time with plain file reads (artifacts/tensor_file.py: no
memory map) and cast to float32 as they are copied into place, so loading holds the float32 CLT
plus one chunk (64 MiB), never a second copy of a layer or of the file
(benchmarks/foreign_memory.py; docs/formats.md, "What each stage holds in memory").
`read_features` reads only some features' rows of each file (autointerp).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

from clt_forge.artifacts.foreign_common import ForeignHeader, block_hooks, relu_log_threshold
from clt_forge.artifacts.tensor_file import TensorFile
from clt_forge.clt.model import pair_offsets
from clt_forge.errors import CLTError

__all__ = ["FORMAT", "detect", "read_features", "read_header", "read_weights"]

FORMAT = "circuit-tracer/clt"
CONFIG = "config.yaml"
KIND = "cross_layer_transcoder"


def detect(folder: Path) -> bool:
    return (folder / CONFIG).is_file() and (folder / "W_enc_0.safetensors").is_file()


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CLTError(f"{path}: not valid YAML ({exc}).") from exc
    kind = config.get("model_kind")
    if kind != KIND:
        raise CLTError(
            f"{path}: model_kind is {kind!r}; clt-forge reads circuit-tracer folders with "
            f"model_kind: {KIND} (a per-layer transcoder set is not a CLT)."
        )
    return config


def layer_count(folder: Path) -> int:
    """L from the W_enc_{l} files, checked contiguous and matched by W_dec_{l} files."""
    found = sorted(
        int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"W_enc_(\d+)\.safetensors", p.name))
    )
    n_layers = len(found)
    if found != list(range(n_layers)):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise CLTError(f"circuit-tracer CLT {folder}: W_enc_{missing[0]}.safetensors is missing.")
    for layer in range(n_layers):
        if not (folder / f"W_dec_{layer}.safetensors").is_file():
            raise CLTError(f"circuit-tracer CLT {folder}: W_dec_{layer}.safetensors is missing.")
    return n_layers


def skip_file(folder: Path, layer: int) -> Path:
    """Where layer `layer`'s W_skip_{layer} is: its own W_skip_{layer}.safetensors, else W_enc_{layer}'s."""
    own = folder / f"W_skip_{layer}.safetensors"
    return own if own.is_file() else folder / f"W_enc_{layer}.safetensors"


def skip_connection(folder: Path, encoder_keys: dict[int, list[str]]) -> bool:
    """Whether the CLT has a skip connection, from the file names and each W_enc_{l}'s keys
    (`encoder_keys`, read by `read_header`); a skip in some layers only is refused."""
    present = [
        layer
        for layer, keys in encoder_keys.items()
        if f"W_skip_{layer}" in keys or (folder / f"W_skip_{layer}.safetensors").is_file()
    ]
    if present and len(present) != len(encoder_keys):
        lacking = next(layer for layer in encoder_keys if layer not in present)
        raise CLTError(
            f"circuit-tracer CLT {folder}: layer {present[0]} has a skip connection (W_skip_{present[0]}) and "
            f"layer {lacking} has none (no W_skip_{lacking}.safetensors, no W_skip_{lacking} key in "
            f"W_enc_{lacking}.safetensors); a skip connection is in every layer or in none."
        )
    return bool(present)


def read_skip(folder: Path, header: ForeignHeader, device: str | torch.device = "cpu") -> torch.Tensor | None:
    """W_skip [L, D, D] (float32, raw units) from the folder's W_skip_{l} tensors, or None when the
    header found no skip connection."""
    if not header.imported.get("skip"):
        return None
    n_layers, d_model = header.n_layers, header.d_model
    W_skip = torch.empty(n_layers, d_model, d_model, device=device)
    for layer in range(n_layers):
        path = skip_file(folder, layer)
        tensors = TensorFile(path)
        if tensors.shape(f"W_skip_{layer}") != [d_model, d_model]:
            raise CLTError(
                f"{path}: W_skip_{layer} is {tensors.shape(f'W_skip_{layer}')}; expected [{d_model}, {d_model}]."
            )
        W_skip[layer] = tensors.read(f"W_skip_{layer}")
    return W_skip


def read_header(folder: Path) -> ForeignHeader:
    config = read_config(folder)
    n_layers = layer_count(folder)
    keys: dict[int, list[str]] = {}
    for layer in range(n_layers):
        with safe_open(folder / f"W_enc_{layer}.safetensors", "pt") as handle:
            keys[layer] = list(handle.keys())
            if layer == 0:
                d_features, d_model = handle.get_slice(f"W_enc_{layer}").get_shape()
    skip = skip_connection(folder, keys)  # a partial skip connection fails here, before any weight is read
    with_threshold = [layer for layer in range(n_layers) if f"threshold_{layer}" in keys[layer]]
    if with_threshold and len(with_threshold) != n_layers:
        lacking = next(layer for layer in range(n_layers) if layer not in with_threshold)
        raise CLTError(
            f"circuit-tracer CLT {folder}: W_enc_{lacking}.safetensors has no threshold_{lacking} while "
            f"layer {with_threshold[0]} has one; a CLT is JumpReLU (threshold_l in every layer) or ReLU (in none)."
        )
    for name in ("feature_input_hook", "feature_output_hook"):
        if not config.get(name):
            raise CLTError(f"{folder / CONFIG}: {name} is missing (the hook point the CLT reads / writes).")
    model = {"hf_name": config["model_name"]} if config.get("model_name") else {}
    activation = "jumprelu" if with_threshold else "relu (read as jumprelu with threshold 0)"
    return ForeignHeader(
        format=FORMAT,
        n_layers=n_layers,
        d_model=int(d_model),
        d_features=int(d_features),
        bandwidth=1.0,  # the STE kernel width: only a finetune uses it (circuit-tracer's default is 2)
        model=model,
        hooks=block_hooks(n_layers, config["feature_input_hook"], config["feature_output_hook"]),
        imported={"format": FORMAT, "folder": str(folder.resolve()), "activation": activation, "skip": skip},
    )


def layer_files(folder: Path, header: ForeignHeader, layer: int) -> tuple[TensorFile, TensorFile]:
    """Layer `layer`'s W_enc / W_dec files, their matrices' shapes checked."""
    L, D, F = header.n_layers, header.d_model, header.d_features
    encoder = TensorFile(folder / f"W_enc_{layer}.safetensors")
    if encoder.shape(f"W_enc_{layer}") != [F, D]:
        raise CLTError(f"{encoder.path}: W_enc_{layer} is {encoder.shape(f'W_enc_{layer}')}; layer 0's is [{F}, {D}].")
    decoder = TensorFile(folder / f"W_dec_{layer}.safetensors")
    if decoder.shape(f"W_dec_{layer}") != [F, L - layer, D]:
        raise CLTError(
            f"{decoder.path}: W_dec_{layer} is {decoder.shape(f'W_dec_{layer}')}; expected [{F}, {L - layer}, {D}]."
        )
    return encoder, decoder


def read_weights(folder: Path, header: ForeignHeader, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Our tensors (see foreign_common) from the per-layer files, float32 on `device`, each
    matrix read CHUNK_BYTES of rows at a time with plain reads and cast as it is copied into place."""
    L, D, F = header.n_layers, header.d_model, header.d_features
    W_enc = torch.empty(L, D, F, device=device)
    b_enc = torch.empty(L, F, device=device)
    log_threshold = torch.full((L, F), -torch.inf, device=device)
    b_dec = torch.empty(L, D, device=device)
    offsets = pair_offsets(L)
    W_dec = torch.empty(F, offsets[-1], D, device=device)
    for layer in range(L):
        encoder, decoder = layer_files(folder, header, layer)
        for start, stop, rows in encoder.chunks(f"W_enc_{layer}"):  # [rows, D] -> our [D, rows]
            W_enc[layer, :, start:stop] = rows.t()
        b_enc[layer] = encoder.read(f"b_enc_{layer}")
        b_dec[layer] = encoder.read(f"b_dec_{layer}")
        if f"threshold_{layer}" in encoder.entries:
            threshold = encoder.read(f"threshold_{layer}")
            log_threshold[layer] = relu_log_threshold(threshold, str(encoder.path)).to(device)
        for start, stop, rows in decoder.chunks(f"W_dec_{layer}"):  # source layer's slot of the packed W_dec
            W_dec[start:stop, offsets[layer] : offsets[layer + 1]] = rows
    ones = torch.ones(L, device=device)
    skip = read_skip(folder, header, device)
    return {
        "W_enc": W_enc,
        "b_enc": b_enc,
        "log_threshold": log_threshold,
        "W_dec": W_dec,
        "b_dec": b_dec,
        "norm.in_scale": ones,
        "norm.out_scale": ones.clone(),
        **({} if skip is None else {"W_skip": skip}),
    }


def read_features(
    folder: Path, header: ForeignHeader, wanted: list[list[int]]
) -> dict[str, list[torch.Tensor] | torch.Tensor]:
    """Each layer's `wanted` features (ascending) as artifacts/feature_subset.py lays them out:
    their rows of W_enc_{l} and W_dec_{l} (features are rows in both), all of b_enc / threshold."""
    L, F = header.n_layers, header.d_features
    b_enc = torch.empty(L, F)
    log_threshold = torch.full((L, F), -torch.inf)
    W_enc, W_dec = [], []
    for layer, features in enumerate(wanted):
        encoder, decoder = layer_files(folder, header, layer)
        W_enc.append(encoder.take(f"W_enc_{layer}", features).float())
        W_dec.append(decoder.take(f"W_dec_{layer}", features).float())
        b_enc[layer] = encoder.read(f"b_enc_{layer}")
        if f"threshold_{layer}" in encoder.entries:
            threshold = encoder.read(f"threshold_{layer}")
            log_threshold[layer] = relu_log_threshold(threshold, str(encoder.path))
    ones = torch.ones(L)
    return {
        "W_enc": W_enc,
        "W_dec": W_dec,
        "b_enc": b_enc,
        "log_threshold": log_threshold,
        "norm.in_scale": ones,
        "norm.out_scale": ones.clone(),
    }
