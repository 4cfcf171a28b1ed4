"""clt-forge: cross-layer transcoders, from cached activations to attribution graphs.

The paper's Python API is re-exported here lazily (importing clt_forge stays cheap).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "clt_forge.models",
    "mlp_activations": "clt_forge.models",
    "ActivationsStore": "clt_forge.data.store",
    "CLTTrainingRunner": "clt_forge.training",
    "CrossLayerTranscoder": "clt_forge.clt",
    "load_checkpoint": "clt_forge.artifacts.checkpoint",
    "AutoInterp": "clt_forge.autointerp.runner",
    "AttributionRunner": "clt_forge.attribution.runner",
    "load_config": "clt_forge.config.compose",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clt_forge' has no attribute {name!r}")
