"""The L0 coefficient and the learning rate at a training step.

The schedules themselves are registries in clt_forge.config.schedules (a new one is one
registered class or function there or in any module, plus its YAML): this module turns a step
into progress and applies the configured one.
"""

from __future__ import annotations

from clt_forge.config.schedules import LR_SCHEDULES, SPARSITY_SCHEDULES, SparsityConfig, register_sparsity
from clt_forge.config.schema import OptimConfig

__all__ = ["LR_SCHEDULES", "SPARSITY_SCHEDULES", "l0_coefficient", "lr_multiplier", "register_sparsity"]


def l0_coefficient(step: int, total_steps: int, cfg: SparsityConfig) -> float:
    """lambda0 at this step."""
    progress = step / max(1, total_steps)
    return cfg.l0_coefficient * cfg.multiplier(progress)


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up from 0 over lr_warmup_fraction of the steps, then the configured schedule."""
    warmup = int(cfg.lr_warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return LR_SCHEDULES.lookup(cfg.lr_schedule)(progress, cfg.lr_final_fraction)
