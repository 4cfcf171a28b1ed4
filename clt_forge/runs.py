"""What every stage does first: seeds, thread count, and the output folder."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from clt_forge.config.schema import PipelineConfig


def output_dir(cfg: PipelineConfig) -> Path:
    """`out=` when given, else the Hydra run directory (runs/<stage>/<time>), else runs/."""
    if cfg.out:
        return Path(cfg.out)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called from Python, outside a Hydra app
        return Path(cfg.runs)


def setup(cfg: PipelineConfig) -> Path:
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    return out
