"""Whole context windows (token ids + raw MLP inputs) in a fixed order, for the autointerp pass.

From an activation dataset: chunks in manifest order (each chunk holds whole windows of the
stored tokens: BOS dropped), read, verified and decoded ahead by background threads; no model
forward. On the fly: the model runs over the text's windows, read at the CLT's declared input
hook. Both yield (tokens [W, S], mlp_in [W, S, L, D]) with S = the tokens a window stores.
`check_sources` refuses, before any weights or model are loaded, a CLT made for another model and
a dataset cached at other hooks than the CLT's (docs/hooks.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from clt_forge.artifacts.activations import block_relative, check_dataset_hooks, read_chunk, read_manifest
from clt_forge.artifacts.checkpoint import CheckpointInfo, check_model_matches
from clt_forge.artifacts.reader import check_compatible
from clt_forge.config.schema import DataConfig, ModelConfig
from clt_forge.data.windows import token_windows, tokens_in_window
from clt_forge.errors import CLTError
from clt_forge.models.activations import window_activations

__all__ = ["WindowBatch", "check_sources", "dataset_windows", "grouped", "model_windows"]

WindowBatch = tuple[torch.Tensor, torch.Tensor]


def check_sources(
    activations: str | Path | None, info: CheckpointInfo, checkpoint: str | Path, model: ModelConfig
) -> tuple[str, str]:
    """The CLT's block-relative (input, output) hooks, where the pass reads, after refusing a CLT
    made for another model (d_model, n_layers, name) and a dataset cached at other hooks."""
    hooks = block_relative(info.hooks)
    check_model_matches(info, checkpoint, model, hooks=info.hooks)  # on the fly: read at its own hooks
    if activations:
        folder = Path(activations)
        manifest = read_manifest(folder)
        check_compatible(manifest, folder, model=model.name, n_layers=model.n_layers, d_model=model.d_model)
        check_dataset_hooks(manifest, folder, hooks, f"checkpoint {checkpoint}", model.name)
    return hooks


def dataset_windows(folder: str | Path, model: ModelConfig, prefetch: int = 2) -> tuple[int, Iterator[WindowBatch]]:
    """(tokens per window, batches) of the dataset's chunks in manifest order."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_compatible(manifest, folder, model=model.name, n_layers=model.n_layers, d_model=model.d_model)
    length = tokens_in_window(manifest.context_size, manifest.prepend_bos)
    spec = manifest.quant_spec

    def batches() -> Iterator[WindowBatch]:
        with ThreadPoolExecutor(max_workers=prefetch) as pool:
            pending = [pool.submit(read_chunk, folder, entry, spec) for entry in manifest.chunks[:prefetch]]
            for entry in manifest.chunks[prefetch:]:
                chunk = pending.pop(0).result()
                pending.append(pool.submit(read_chunk, folder, entry, spec))
                yield _windows(chunk.tokens, chunk.mlp_in, length, folder)
            for future in pending:
                chunk = future.result()
                yield _windows(chunk.tokens, chunk.mlp_in, length, folder)

    return length, batches()


def model_windows(
    model: Any, data: DataConfig, windows_per_forward: int = 8, hooks: tuple[str, str] | None = None
) -> tuple[int, Iterator[WindowBatch]]:
    """(tokens per window, batches) from running `model` over the text, cycling through it, read
    at the block-relative `hooks` (the CLT's declared ones; None: the MLP's own input)."""
    length = tokens_in_window(data.context_size, data.prepend_bos)

    def batches() -> Iterator[WindowBatch]:
        windows = itertools.chain.from_iterable(token_windows(data, model.tokenizer) for _ in itertools.count())
        while True:
            stacked = torch.stack(list(itertools.islice(windows, windows_per_forward)))
            tokens, mlp_in, _ = window_activations(model, stacked, data.prepend_bos, windows_per_forward, hooks=hooks)
            yield tokens.view(-1, length), mlp_in.view(-1, length, *mlp_in.shape[1:])

    return length, batches()


def _windows(tokens: torch.Tensor, mlp_in: torch.Tensor, length: int, folder: Path) -> WindowBatch:
    if tokens.numel() % length:
        raise CLTError(f"{folder}: a chunk holds {tokens.numel()} tokens, not whole windows of {length}.")
    return tokens.view(-1, length), mlp_in.view(-1, length, *mlp_in.shape[1:])


def grouped(batches: Iterator[WindowBatch], tokens: int) -> Iterator[WindowBatch]:
    """Concatenate consecutive batches until each holds at least `tokens` tokens (whole windows)."""
    parts: list[WindowBatch] = []
    held = 0
    for batch in batches:
        parts.append(batch)
        held += batch[0].numel()
        if held >= tokens:
            yield _cat(parts)
            parts, held = [], 0
    if parts:
        yield _cat(parts)


def _cat(parts: list[WindowBatch]) -> WindowBatch:
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
