"""Models TransformerLens knows by name (gpt2, meta-llama/Llama-3.2-1B, google/gemma-2-2b, ...)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from clt_forge.config.schema import ModelConfig
from clt_forge.errors import CLTError
from clt_forge.models.loading import register_loader, torch_dtype

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@register_loader("transformer_lens")
def load_transformer_lens(cfg: ModelConfig) -> HookedTransformer:
    import transformer_lens

    if not cfg.hf_name:
        raise CLTError(
            f"model '{cfg.name}': source transformer_lens needs model.hf_name (a TransformerLens model name)."
        )
    try:
        return transformer_lens.HookedTransformer.from_pretrained(
            cfg.hf_name,
            fold_ln=False,
            center_writing_weights=False,
            center_unembed=False,
            device=cfg.device,
            dtype=torch_dtype(cfg),
        )
    except (OSError, ValueError) as err:
        raise CLTError(
            f"model '{cfg.name}': TransformerLens could not load '{cfg.hf_name}' ({err}). "
            "Hub models need network access or a populated Hugging Face cache."
        ) from err
