"""clt-forge: cross-layer transcoders, from cached activations to attribution graphs.

The paper's Python API is re-exported here lazily (importing clt_forge stays cheap).
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"

# torch's CPU allocator asks for transparent huge pages for tensors of >= 2 MB when this is set.
# torch reads it once, at its first allocation, so it must be set before that: importing
# clt_forge (which `clt` and `python -m clt_forge` do first) sets it unless the user did.
# Without it each fresh large tensor is faulted in 4 KiB at a time: an elementwise op on a
# [256, 30, 4608] tensor took 4x as long (docs/performance.md, "Huge pages"). THP_MEM_ALLOC_ENABLE=0
# turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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
