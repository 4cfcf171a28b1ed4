"""Language models: load any configured model as a TransformerLens HookedTransformer, and read
every layer's exact MLP input and output from it.

Importing this package registers the built-in model sources (gguf, transformer_lens, tiny; each
module registers itself with `@register_loader`) and stays light: torch and TransformerLens are
imported when a model is loaded, so the CLI can validate `model.source` at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clt_forge.models.gguf import load_gguf  # each loader module registers its source
from clt_forge.models.hub import load_transformer_lens
from clt_forge.models.loading import MODEL_LOADERS, load_model, model_config, register_loader
from clt_forge.models.tiny import load_tiny

if TYPE_CHECKING:
    from clt_forge.models.activations import mlp_activations

__all__ = [
    "MODEL_LOADERS",
    "load_gguf",
    "load_model",
    "load_tiny",
    "load_transformer_lens",
    "mlp_activations",
    "model_config",
    "register_loader",
]


def __getattr__(name: str) -> Any:
    if name == "mlp_activations":
        from clt_forge.models.activations import mlp_activations

        return mlp_activations
    raise AttributeError(f"module 'clt_forge.models' has no attribute {name!r}")
