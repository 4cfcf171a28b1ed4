"""`clt autointerp`: explain and score a CLT's features (see clt_forge/autointerp/)."""

from __future__ import annotations

from pathlib import Path

from clt_forge.autointerp.runner import AutoInterp
from clt_forge.config.schema import AutointerpConfig
from clt_forge.runs import setup


def run(cfg: AutointerpConfig) -> Path:
    out = setup(cfg)
    return AutoInterp(cfg).run(out=out)
