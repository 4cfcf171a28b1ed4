"""`ActivationsStore`: the one source of training / autointerp batches, in two modes.

- cached: an activation dataset written by `clt cache` (ActivationReader: seeded chunk order,
  cross-chunk shuffling, background decode, exact resume by token position);
- on the fly: the model runs over the text as batches are needed (quick experiments), its
  activations shuffled through an in-memory buffer.

Both yield `ActivationBatch(mlp_in, mlp_out, tokens)` with BOS positions already dropped.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from clt_forge.artifacts.reader import ActivationBatch, ActivationReader
from clt_forge.config.schema import DataConfig
from clt_forge.data import token_windows
from clt_forge.models.activations import window_activations


class ActivationsStore:
    def __init__(self, batches: Iterator[ActivationBatch] | Any, n_layers: int, d_model: int, describe: str):
        self._batches = batches
        self.n_layers, self.d_model, self.describe = n_layers, d_model, describe

    @classmethod
    def from_cache(cls, path: str | Path, batch_size: int, **reader_kwargs: Any) -> ActivationsStore:
        reader = ActivationReader(path, batch_size, **reader_kwargs)
        store = cls(reader, reader.manifest.n_layers, reader.manifest.d_model, f"cached dataset {path}")
        store.reader = reader
        return store

    @classmethod
    def from_model(
        cls,
        model: Any,
        data: DataConfig,
        batch_size: int,
        *,
        split: str = "train",
        seed: int = 0,
        windows_per_forward: int = 8,
        buffer_tokens: int = 8192,
    ) -> ActivationsStore:
        batches = _on_the_fly(model, data, batch_size, split, seed, windows_per_forward, buffer_tokens)
        return cls(batches, model.cfg.n_layers, model.cfg.d_model, f"model {model.cfg.model_name} on the fly")

    reader: ActivationReader | None = None

    @property
    def tokens_served(self) -> int:
        return self.reader.tokens_served if self.reader is not None else 0

    def __iter__(self) -> Iterator[ActivationBatch]:
        return iter(self._batches)


def _on_the_fly(
    model: Any, data: DataConfig, batch_size: int, split: str, seed: int, windows_per_forward: int, buffer_tokens: int
) -> Iterator[ActivationBatch]:
    generator = torch.Generator().manual_seed(seed)
    windows = itertools.chain.from_iterable(token_windows(data, model.tokenizer, split) for _ in itertools.count())
    buffer: ActivationBatch | None = None
    while True:
        stacked = torch.stack(list(itertools.islice(windows, windows_per_forward)))
        tokens, mlp_in, mlp_out = window_activations(model, stacked, data.prepend_bos, windows_per_forward)
        fresh = ActivationBatch(mlp_in, mlp_out, tokens)
        buffer = fresh if buffer is None else _cat(buffer, fresh)
        if buffer.tokens.numel() < buffer_tokens:
            continue
        perm = torch.randperm(buffer.tokens.numel(), generator=generator)
        buffer = ActivationBatch(buffer.mlp_in[perm], buffer.mlp_out[perm], buffer.tokens[perm])
        keep = buffer_tokens // 2  # half stays to mix with the next forward passes
        while buffer.tokens.numel() - keep >= batch_size:
            yield ActivationBatch(buffer.mlp_in[:batch_size], buffer.mlp_out[:batch_size], buffer.tokens[:batch_size])
            buffer = ActivationBatch(
                buffer.mlp_in[batch_size:], buffer.mlp_out[batch_size:], buffer.tokens[batch_size:]
            )


def _cat(a: ActivationBatch, b: ActivationBatch) -> ActivationBatch:
    return ActivationBatch(
        torch.cat([a.mlp_in, b.mlp_in]), torch.cat([a.mlp_out, b.mlp_out]), torch.cat([a.tokens, b.tokens])
    )
