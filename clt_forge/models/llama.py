"""A Hugging Face Llama-architecture model -> a TransformerLens HookedTransformer, built by hand.

TransformerLens does not know every Llama-architecture name (SmolLM2 among them), but it knows
the architecture: we build the HookedTransformerConfig from the HF config (RMS norm, rotary
with rotary_base = rope_theta, gated SiLU MLP, grouped-query attention) and convert the
weights with TransformerLens's own llama converter. fold_ln stays off so the MLP input is
the normed residual times the ln2 gain: the exact tensor the HF MLP sees.
"""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights


def tl_config_from_llama(
    hf_config: Any, *, name: str, dtype: torch.dtype, device: str, n_ctx: int
) -> HookedTransformerConfig:
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    n_kv = hf_config.num_key_value_heads
    return HookedTransformerConfig(
        model_name=name,
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=hf_config.num_attention_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=min(hf_config.max_position_embeddings, n_ctx),  # each layer holds an n_ctx^2 mask
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        n_key_value_heads=n_kv if n_kv != hf_config.num_attention_heads else None,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        rotary_base=float(hf_config.rope_theta),
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        tokenizer_prepends_bos=True,
        dtype=dtype,
        device=device,
        default_prepend_bos=False,  # windows carry their own BOS (clt_forge.data.windows)
        init_weights=False,  # every weight is overwritten by the converted state dict
    )


def hooked_from_llama(
    hf_model: Any, tokenizer: Any, *, name: str, dtype: torch.dtype, device: str, n_ctx: int
) -> HookedTransformer:
    cfg = tl_config_from_llama(hf_model.config, name=name, dtype=dtype, device=device, n_ctx=n_ctx)
    state_dict = convert_llama_weights(hf_model, cfg)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    # No weight processing is wanted (fold_ln etc. all off), so a plain load is exact, and
    # much faster than TransformerLens's key-by-key load_and_process_state_dict.
    result = model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    missing = [key for key in result.missing_keys if key not in buffers]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"llama -> TransformerLens conversion: missing {missing}, unexpected {result.unexpected_keys}"
        )
    return model.to(device, print_details=False)
