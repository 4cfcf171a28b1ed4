"""Pack documents into fixed context windows of token ids.

BOS handling (the same for every stage and documented in docs/formats.md): documents are
tokenized without special tokens and concatenated, each followed by the tokenizer's EOS;
the stream is cut into pieces of `context_size - 1` tokens and every window is
[BOS] + piece. So position 0 of every window is BOS, which the CLT never models (the cache
does not store it); a window may span a document boundary, marked by EOS. With
`prepend_bos=false` windows are plain `context_size` pieces of the stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from clt_forge.config.schema import DataConfig
from clt_forge.data.text import Document, load_documents
from clt_forge.errors import CLTError


def tokens_in_window(context_size: int, prepend_bos: bool) -> int:
    """Tokens of a window after its BOS: what the cache stores and the CLT models."""
    return context_size - 1 if prepend_bos else context_size


def token_windows(
    cfg: DataConfig,
    tokenizer: Any,
    split: str = "train",
    documents: list[Document] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield int64 tensors of shape [context_size], in a deterministic order."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if cfg.prepend_bos and bos is None:
        raise CLTError("data.prepend_bos=true but the model's tokenizer has no BOS token: set data.prepend_bos=false.")
    if cfg.context_size < 2:
        raise CLTError(f"data.context_size={cfg.context_size}: use at least 2.")
    piece = tokens_in_window(cfg.context_size, cfg.prepend_bos)
    buffer: list[int] = []
    for doc in documents if documents is not None else load_documents(cfg, split):
        buffer.extend(tokenizer(doc.text, add_special_tokens=False).input_ids)
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= piece:
            ids = ([bos] if cfg.prepend_bos else []) + buffer[:piece]
            del buffer[:piece]
            yield torch.tensor(ids, dtype=torch.int64)
