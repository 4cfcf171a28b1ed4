"""Where clt-forge keeps files outside a run folder (converted models, tokenizers)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$CLT_FORGE_CACHE, else $XDG_CACHE_HOME/clt-forge, else ~/.cache/clt-forge."""
    env = os.environ.get("CLT_FORGE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clt-forge"
