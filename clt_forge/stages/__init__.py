"""The five stages. Each module `clt_forge.stages.<stage>` has `run(cfg) -> Path`.

Stage modules are imported only when their stage runs, so `clt --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from clt_forge.errors import CLTError

STAGES: dict[str, str] = {
    "cache": "Run the model over text and write a quantized, chunked activation dataset.",
    "train": "Train a cross-layer transcoder on an activation dataset (or on the fly).",
    "autointerp": "Find top activating contexts and statistics per feature; explain and score them.",
    "attribute": "Compute an attribution graph for a prompt through the trained CLT.",
    "serve": "Explore attribution graphs, build clusters and intervene in a local web interface.",
    "demo": "Run cache -> train -> attribute -> autointerp on the embedded default into runs/demo.",
}


def run_stage_task(stage: str) -> Callable[[DictConfig], Any]:
    """The function Hydra calls with the composed config of one job."""

    def task(cfg: DictConfig) -> Any:
        typed = OmegaConf.to_object(cfg)
        module = importlib.import_module(f"clt_forge.stages.{stage}")
        try:
            return module.run(typed)
        except CLTError as err:
            print(f"clt {stage}: error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None

    task.__name__ = stage
    task.__module__ = __name__
    return task
