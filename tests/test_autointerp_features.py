"""`clt autointerp` reads only the features it explains (issue 20): `load_features` gives the
same encoders and logit tokens as loading the whole CLT did, in every checkpoint format.

The old path is kept here verbatim (runner.py's `_slice` / `_logit_tokens` before the change,
on `load_checkpoint`'s CLT) and the new one must match it bit for bit. Memory: see
tests/test_foreign_memory.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_foreign_checkpoints import (
    D,
    F,
    L,
    circuit_tracer_clt,
    our_checkpoint,
    reference_tensors,
    write_circuit_tracer,
    write_reference,
)

from clt_forge.artifacts import tensor_file
from clt_forge.artifacts.checkpoint import load_checkpoint, read_info, shard_file, weight_tensors, write_tensors
from clt_forge.artifacts.normalization import Normalization
from clt_forge.artifacts.tensor_file import TensorFile
from clt_forge.autointerp.collect import FeatureSlice
from clt_forge.autointerp.runner import _logit_tokens, _slice, select_features
from clt_forge.clt.model import CrossLayerTranscoder

VOCAB = 40


def old_slice(clt: CrossLayerTranscoder, norm: Normalization, chosen: list[tuple[int, int]]) -> FeatureSlice:
    layers = [layer for layer, _ in chosen]
    features = [feature for _, feature in chosen]
    W, b, theta = [], [], []
    with torch.no_grad():
        threshold = clt.jumprelu_threshold()
        for layer in range(clt.n_layers):
            cols = torch.tensor([f for lay, f in chosen if lay == layer], dtype=torch.int64)
            W.append(clt.W_enc[layer][:, cols].T.float().contiguous())
            b.append(clt.b_enc[layer][cols].float())
            theta.append(threshold[layer][cols].float())
    order = sorted(range(len(chosen)), key=lambda i: (layers[i], i))
    return FeatureSlice(
        [layers[i] for i in order], [features[i] for i in order], W, b, theta, norm.in_scale.float().clone()
    )


def old_logit_tokens(
    clt: CrossLayerTranscoder, norm: Normalization, model: Any, layers: list[int], features: list[int], k: int
) -> tuple[list[list[int]], list[list[int]]]:
    W_U = model.W_U.detach().float()
    top, bottom = [], []
    with torch.no_grad():
        for layer in sorted(set(layers)):
            idx = [i for i, lay in enumerate(layers) if lay == layer]
            cols = torch.tensor([features[i] for i in idx])
            decoder = clt.decoder(layer)[cols].float() * norm.out_scale[layer:, None].float()
            logits = decoder.sum(1) @ W_U
            k_eff = min(k, logits.shape[1])
            highs, lows = logits.topk(k_eff).indices.tolist(), (-logits).topk(k_eff).indices.tolist()
            for j, i in enumerate(idx):
                top.append((i, highs[j]))
                bottom.append((i, lows[j]))
    top.sort()
    bottom.sort()
    return [t for _, t in top], [b for _, b in bottom]


def sharded_checkpoint(folder: Path, world: int = 3) -> Path:
    """Our checkpoint split by features into `world` shard files, as a feature-sharded run writes it."""
    whole = our_checkpoint(
        folder.with_name(folder.name + "-whole"), Normalization(torch.rand(L) + 0.5, torch.rand(L) + 0.5)
    )
    clt, norm, info = load_checkpoint(whole)
    tensors = weight_tensors(clt, norm)
    bounds = torch.linspace(0, F, world + 1).long().tolist()
    dims = {"W_enc": 2, "b_enc": 1, "log_threshold": 1, "W_dec": 0}
    folder.mkdir()
    for rank in range(world):
        cut = slice(bounds[rank], bounds[rank + 1])
        part = {k: (v[(slice(None),) * dims[k] + (cut,)] if k in dims else v) for k, v in tensors.items()}
        write_tensors(folder / shard_file("clt", rank, world), part)
    info.shards = {
        "world": world,
        "files": [shard_file("clt", r, world) for r in range(world)],
        "slices": [[bounds[r], bounds[r + 1]] for r in range(world)],
    }
    (folder / "config.json").write_text(json.dumps(info.__dict__, default=str))
    return folder


FORMATS = {
    "ours": lambda p: our_checkpoint(p, Normalization(torch.rand(L) * 3 + 0.2, torch.rand(L) * 3 + 0.2)),
    "ours-sharded": sharded_checkpoint,
    "circuit-tracer-bf16": lambda p: write_circuit_tracer(p, circuit_tracer_clt().to(torch.bfloat16)),
    "circuit-tracer-relu": lambda p: write_circuit_tracer(p, circuit_tracer_clt("relu")),
    "reference-ranks": lambda p: write_reference(p, reference_tensors(), world=3),
    "reference-per-layer": lambda p: write_reference(p, reference_tensors(cross_layer=False)),
}


@pytest.mark.parametrize("kind", list(FORMATS))
@pytest.mark.parametrize("workers", [1, 3])
def test_partial_read_equals_slicing_the_loaded_clt(tmp_path, monkeypatch, kind, workers):
    from clt_forge.artifacts.checkpoint import load_features

    folder = FORMATS[kind](tmp_path / kind)
    info = read_info(folder)
    model = SimpleNamespace(W_U=torch.randn(D, VOCAB, generator=torch.Generator().manual_seed(1)))
    clt, norm, _ = load_checkpoint(folder)
    monkeypatch.setattr(tensor_file, "CHUNK_BYTES", 3 * 4 * D)  # a few rows per read: spans and chunks cut up
    monkeypatch.setattr(tensor_file, "GAP_BYTES", 4 * D)
    for index in range(workers):
        chosen = select_features(info.n_layers, info.d_features, None, index, workers)
        want = old_slice(clt, norm, chosen)
        want_top, want_bottom = old_logit_tokens(clt, norm, model, want.layers, want.features, 5)
        subset = load_features(folder, chosen)
        got = _slice(subset)
        assert (got.layers, got.features) == (want.layers, want.features)
        for name in ("W_enc", "b_enc", "threshold"):
            for layer, (a, b) in enumerate(zip(getattr(got, name), getattr(want, name), strict=True)):
                assert a.dtype == b.dtype == torch.float32
                assert torch.equal(a, b), f"{kind}: {name} of layer {layer}"
        assert torch.equal(got.in_scale, want.in_scale)
        for layer, rows in enumerate(subset.W_dec):
            cols = [f for lay, f in chosen if lay == layer]
            assert torch.equal(rows, clt.decoder(layer)[cols]), f"{kind}: decoder rows of layer {layer}"
        assert _logit_tokens(subset, model, 5) == (want_top, want_bottom)


def test_take_reads_any_rows_in_any_order(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    matrix = torch.randn(5, 7, 3)
    save_file({"m": matrix}, tmp_path / "m.safetensors")
    weights = TensorFile(tmp_path / "m.safetensors")
    flat = matrix.reshape(35, 3)
    for chunk, gap in ((1 << 20, 1 << 20), (12, 12), (24, 40)):
        monkeypatch.setattr(tensor_file, "CHUNK_BYTES", chunk)
        monkeypatch.setattr(tensor_file, "GAP_BYTES", gap)
        for index in ([], [4], [0, 1, 2, 4], [3, 0, 3, 2]):
            assert torch.equal(weights.take("m", index), matrix[index])
        rows = [34, 0, 8, 9, 10, 20, 9]
        assert torch.equal(weights.take("m", rows, lead=2), flat[rows])
        got = torch.cat([r.clone() for _, _, r in weights.chunks("m", lead=2, start=7, stop=21)])
        assert torch.equal(got, flat[7:21])
