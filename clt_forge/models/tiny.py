"""`tiny`: a small random-weight Llama-architecture model with a byte-level tokenizer.

It goes through exactly the same conversion as the embedded model (HF Llama -> TransformerLens),
so tests on it exercise the real code path in a fraction of a second. Token ids 0-255 are
bytes; 256-259 are <bos>, <eos>, <pad>, <unk>.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clt_forge.config.schema import ModelConfig
from clt_forge.models.loading import register_loader, torch_dtype
from clt_forge.paths import cache_root

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

SPECIAL_TOKENS = ["<bos>", "<eos>", "<pad>", "<unk>"]


def byte_tokenizer() -> Any:
    """A Hugging Face fast tokenizer mapping each UTF-8 byte to one token.

    Saved once under the cache root and loaded from there: TransformerLens re-loads a
    tokenizer by its `name_or_path`, so it must live in a folder.
    """
    from transformers import AutoTokenizer

    folder = cache_root() / "tokenizers" / "bytes-v1"
    if not (folder / "tokenizer.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".bytes-", dir=folder.parent))
        _build_byte_tokenizer().save_pretrained(scratch)
        try:
            os.replace(scratch, folder)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(scratch, ignore_errors=True)
    return AutoTokenizer.from_pretrained(folder)


def _build_byte_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in enumerate(sorted(alphabet, key=_byte_of_char))}
    vocab = {char: byte for byte, char in byte_to_char.items()}
    vocab.update({tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _byte_of_char(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode table, which ByteLevel uses."""
    code = ord(char)
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


@register_loader("tiny")
def load_tiny(cfg: ModelConfig) -> HookedTransformer:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from clt_forge.models.llama import hooked_from_llama

    torch.manual_seed(cfg.seed)
    hf_config = LlamaConfig(
        vocab_size=cfg.d_vocab,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_key_value_heads or cfg.n_heads,
        max_position_embeddings=2048,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    hf_model = LlamaForCausalLM(hf_config).eval()
    return hooked_from_llama(
        hf_model, byte_tokenizer(), name=cfg.name, dtype=torch_dtype(cfg), device=cfg.device, n_ctx=cfg.n_ctx
    )
