"""Schedules as pure functions of progress: the L0 (sparsity) coefficient and the learning rate.

Each is a registry entry, so a new schedule is one decorated function. Progress is
step / total_steps in [0, 1]; the value is a multiplier of the configured plateau value.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from clt_forge.config.schema import LRSchedule, OptimConfig, SparsityConfig, SparsitySchedule
from clt_forge.registry import Registry

SparsityFn = Callable[[float, SparsityConfig], float]
SPARSITY_SCHEDULES: Registry[SparsitySchedule, SparsityFn] = Registry()
register_sparsity = SPARSITY_SCHEDULES.register


@register_sparsity(SparsitySchedule.constant)
def constant(progress: float, cfg: SparsityConfig) -> float:
    return 1.0


@register_sparsity(SparsitySchedule.linear_warmup)
def linear_warmup(progress: float, cfg: SparsityConfig) -> float:
    """0 -> 1 over the first warmup_fraction of training, then a plateau (paper Figure 3b)."""
    return min(1.0, progress / cfg.warmup_fraction) if cfg.warmup_fraction > 0 else 1.0


@register_sparsity(SparsitySchedule.delayed_linear)
def delayed_linear(progress: float, cfg: SparsityConfig) -> float:
    """0 until delay_fraction, then linear to 1 at the end of training."""
    if progress <= cfg.delay_fraction:
        return 0.0
    return min(1.0, (progress - cfg.delay_fraction) / max(1e-12, 1.0 - cfg.delay_fraction))


def l0_coefficient(step: int, total_steps: int, cfg: SparsityConfig) -> float:
    """lambda0 at this step."""
    progress = step / max(1, total_steps)
    return cfg.l0_coefficient * SPARSITY_SCHEDULES[cfg.schedule](progress, cfg)


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up from 0, then constant / linear / cosine decay to lr_final_fraction."""
    warmup = int(cfg.lr_warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule is LRSchedule.constant:
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    final = cfg.lr_final_fraction
    if cfg.lr_schedule is LRSchedule.linear:
        return 1.0 - (1.0 - final) * progress
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
