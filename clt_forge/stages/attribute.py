"""`clt attribute`: not built yet (see the project's open issues)."""

from __future__ import annotations

from pathlib import Path

from clt_forge.errors import NotImplementedStage


def run(cfg: object) -> Path:
    raise NotImplementedStage("clt attribute is not implemented yet; nothing was written.")
