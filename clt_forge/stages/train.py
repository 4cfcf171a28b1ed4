"""`clt train`: train a CLT (see clt_forge/training/runner.py)."""

from __future__ import annotations

from pathlib import Path

from clt_forge.config.schema import TrainConfig
from clt_forge.training.runner import CLTTrainingRunner


def run(cfg: TrainConfig) -> Path:
    return CLTTrainingRunner(cfg).run()
