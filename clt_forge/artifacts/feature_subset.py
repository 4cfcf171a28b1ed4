"""A few features of a CLT: their encoders and decoder rows, read without loading the CLT.

`clt autointerp` explains some of a CLT's features (a worker's share, a graph's features). It
needs their encoder columns, to compute their activations, and their decoder rows, for their
top logits; never the other features' decoders, which are most of a CLT (source l's decoder
covers L - l target layers: P = L(L+1)/2 blocks against L for the encoders). `load_features`
(checkpoint.py) reads just these from any checkpoint format, with the format's `read_features`
(ours: `read_our_features` here; foreign_circuit_tracer.py, foreign_reference.py), which hand
back the same values `load_checkpoint` would hold, float32:

    W_enc   per layer l [n_l, D]          the chosen features' encoder columns (transposed)
    W_dec   per layer l [n_l, L - l, D]   their decoders to targets l .. L-1 (normalised units)
    b_enc, log_threshold [L, F]           every feature's (small: L F numbers)
    norm.in_scale, norm.out_scale [L]

An encoder matrix stored [L, D, F] (ours, the reference library's) is read a chunk of rows at a
time and its chosen columns kept; feature-major matrices (circuit-tracer's files, our W_dec
[F, P, D]) and the reference W_dec [P, F, D] give up just the wanted rows (`TensorFile.take`).
Peak: the result plus one chunk (benchmarks/foreign_memory.py, mode `autointerp`).

Order: layer-major, features ascending within a layer, duplicates dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from clt_forge.artifacts.tensor_file import TensorFile
from clt_forge.clt.model import pair_offsets

__all__ = [
    "FeatureSubset",
    "encoder_columns",
    "file_parts",
    "joined",
    "read_chosen",
    "read_our_features",
    "subset",
    "wanted_by_layer",
]


@dataclass
class FeatureSubset:
    """The chosen features of a CLT, layer-major (see the module docstring), float32."""

    layers: list[int]  # layer of each feature, flattened order
    features: list[int]  # index within its layer
    W_enc: list[torch.Tensor]  # per layer [n_l, D]
    b_enc: list[torch.Tensor]  # per layer [n_l]
    threshold: list[torch.Tensor]  # per layer [n_l]: theta = exp(log_threshold)
    W_dec: list[torch.Tensor]  # per layer [n_l, L - l, D], normalised units
    in_scale: torch.Tensor  # [L]
    out_scale: torch.Tensor  # [L]


def wanted_by_layer(chosen: Sequence[tuple[int, int]], n_layers: int) -> list[list[int]]:
    """Each layer's chosen features, ascending, once each."""
    wanted: list[set[int]] = [set() for _ in range(n_layers)]
    for layer, feature in chosen:
        wanted[layer].add(feature)
    return [sorted(features) for features in wanted]


def subset(wanted: list[list[int]], tensors: dict[str, list[torch.Tensor] | torch.Tensor]) -> FeatureSubset:
    """A format reader's tensors (module docstring) as a FeatureSubset."""
    b_enc, log_threshold = tensors["b_enc"], tensors["log_threshold"]
    in_scale, out_scale = tensors["norm.in_scale"], tensors["norm.out_scale"]
    W_enc, W_dec = tensors["W_enc"], tensors["W_dec"]
    assert isinstance(b_enc, torch.Tensor) and isinstance(log_threshold, torch.Tensor)
    assert isinstance(in_scale, torch.Tensor) and isinstance(out_scale, torch.Tensor)
    assert isinstance(W_enc, list) and isinstance(W_dec, list)
    threshold = log_threshold.float().exp()  # all [L, F] at once, as CrossLayerTranscoder.jumprelu_threshold
    columns = [torch.tensor(features, dtype=torch.int64) for features in wanted]
    return FeatureSubset(
        layers=[layer for layer, features in enumerate(wanted) for _ in features],
        features=[feature for features in wanted for feature in features],
        W_enc=W_enc,
        b_enc=[b_enc[layer][cols].float() for layer, cols in enumerate(columns)],
        threshold=[threshold[layer][cols].float() for layer, cols in enumerate(columns)],
        W_dec=W_dec,
        in_scale=in_scale.float(),
        out_scale=out_scale.float(),
    )


def file_parts(features: list[int], bounds: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """(file, its local indices) for ascending global `features` over files holding contiguous
    feature slices `bounds` [(start, stop), ...] in order; files holding none are left out."""
    parts = []
    for number, (start, stop) in enumerate(bounds):
        local = [feature - start for feature in features if start <= feature < stop]
        if local:
            parts.append((number, local))
    return parts


def encoder_columns(weights: TensorFile, key: str, layer: int, columns: list[int]) -> torch.Tensor:
    """Columns `columns` of layer `layer` of an [L, D, f] matrix as [n, D] float32, read a chunk of
    the layer's D rows at a time."""
    d_model = weights.shape(key)[1]
    out = torch.empty(len(columns), d_model)
    if not columns:
        return out
    index = torch.tensor(columns, dtype=torch.int64)
    first = layer * d_model
    for start, stop, rows in weights.chunks(key, lead=2, start=first, stop=first + d_model):
        out[:, start - first : stop - first] = rows[:, index].T
    return out


def joined(parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """The per-file pieces of one layer, in file order (one piece is used as read)."""
    if not parts:
        return empty
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def read_chosen(
    handles: list[TensorFile],
    bounds: list[tuple[int, int]],
    wanted: list[list[int]],
    d_model: int,
    decoder: Callable[[TensorFile, int, list[int]], torch.Tensor],
) -> dict[str, list[torch.Tensor] | torch.Tensor]:
    """What the [L, D, f]-encoder formats (ours, the reference library's) share: file by file
    (`handles`, holding the contiguous feature slices `bounds`), each layer's chosen features'
    encoder columns and decoder rows (`decoder(file, layer, local features)`: [n, L - layer, D]),
    and every feature's b_enc / log_threshold."""
    L, D = len(wanted), d_model
    W_enc, W_dec = [], []
    for layer, features in enumerate(wanted):
        encoders, decoders = [], []
        for number, local in file_parts(features, bounds):
            encoders.append(encoder_columns(handles[number], "W_enc", layer, local))
            decoders.append(decoder(handles[number], layer, local))
        W_enc.append(joined(encoders, torch.empty(0, D)))
        W_dec.append(joined(decoders, torch.empty(0, L - layer, D)))
    return {
        "W_enc": W_enc,
        "W_dec": W_dec,
        "b_enc": torch.cat([weights.read("b_enc").float() for weights in handles], dim=1),
        "log_threshold": torch.cat([weights.read("log_threshold").float() for weights in handles], dim=1),
    }


def read_our_features(
    files: list[tuple[Path, tuple[int, int]]], n_layers: int, d_model: int, wanted: list[list[int]]
) -> dict[str, list[torch.Tensor] | torch.Tensor]:
    """The chosen features from our checkpoint files (clt.safetensors, or the shards with the
    feature slices they hold): W_enc [L, D, f] by columns, W_dec [f, P, D] by the rows of each
    feature's source-layer slots."""
    offsets = pair_offsets(n_layers)

    def decoder(weights: TensorFile, layer: int, local: list[int]) -> torch.Tensor:
        targets, pairs = n_layers - layer, weights.shape("W_dec")[1]
        rows = [f * pairs + offsets[layer] + t for f in local for t in range(targets)]
        return weights.take("W_dec", rows, lead=2).float().view(len(local), targets, d_model)

    handles = [TensorFile(path) for path, _ in files]
    chosen = read_chosen(handles, [held for _, held in files], wanted, d_model, decoder)
    first = handles[0]
    return chosen | {
        "norm.in_scale": first.read("norm.in_scale").float(),
        "norm.out_scale": first.read("norm.out_scale").float(),
    }
