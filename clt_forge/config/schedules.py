"""Schedules of the L0 coefficient and the learning rate, as multipliers of their plateau value.

A sparsity schedule is one registered dataclass: the `sparsity` group's schema for that choice
(its own settings, checked in `__post_init__`) and its formula (`multiplier`). An lr schedule is
one registered function of (progress, final fraction). Progress is step / total_steps in [0, 1].
They live beside the config because they are pure functions of it: the config is validated
against these registries before a run starts (clt_forge.training.schedules applies them).

A new sparsity schedule is a subclass registered under its name plus conf/sparsity/<name>.yaml
whose defaults list `schema_<name>` (the class, stored by clt_forge.config.compose); see
docs/extending.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clt_forge.registry import Registry

SPARSITY_SCHEDULES: Registry[type[SparsityConfig]] = Registry("sparsity.schedule")
LRFn = Callable[[float, float], float]  # (progress after warm-up, final fraction) -> multiplier
LR_SCHEDULES: Registry[LRFn] = Registry("optim.lr_schedule")
DEFAULT_SPARSITY_SCHEDULE = "linear_warmup"


@dataclass
class SparsityConfig:
    """The L0 coefficient schedule (paper eq. 6: lambda0, C) and the dead-feature term.

    Each schedule is a subclass holding its own settings. `SparsityConfig(schedule=NAME, ...)`
    builds the subclass registered under NAME (default: linear_warmup)."""

    schedule: str = DEFAULT_SPARSITY_SCHEDULE  # which registered schedule (clt_forge/config/schedules.py)
    l0_coefficient: float = 2.0  # lambda0 at its plateau
    c: float = 1.0  # the C inside tanh(C * z * ||W_dec||)
    dead_coefficient: float = 1e-5  # lambda1 of the dead-feature term

    def __new__(cls, *args: Any, **kwargs: Any) -> SparsityConfig:
        if cls is SparsityConfig:  # the base class stands for the schedule its `schedule` names
            name = kwargs.get("schedule", args[0] if args else DEFAULT_SPARSITY_SCHEDULE)
            cls = SPARSITY_SCHEDULES.lookup(name)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        registered = SPARSITY_SCHEDULES.get(self.schedule)
        if registered is not type(self):
            raise ValueError(
                f"sparsity.schedule={self.schedule!r} does not match the settings of "
                f"{type(self).__name__}: choose a schedule with sparsity=NAME (its YAML sets both)"
            )

    def multiplier(self, progress: float) -> float:
        """lambda0 / l0_coefficient at this point of training."""
        raise NotImplementedError(f"{type(self).__name__} defines no multiplier")


def register_sparsity(name: str) -> Callable[[type[SparsityConfig]], type[SparsityConfig]]:
    """Class decorator: the subclass is the schedule `name` (its `schedule` field defaults to it)."""

    def add(cls: type[SparsityConfig]) -> type[SparsityConfig]:
        if cls.__dataclass_fields__["schedule"].default != name:
            raise ValueError(f"{cls.__name__}.schedule must default to its registered name {name!r}")
        return SPARSITY_SCHEDULES.register(name)(cls)

    return add


def _fraction(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"sparsity.{key}={value!r}: expected a fraction of training in [0, 1]")


@register_sparsity("constant")
@dataclass
class Constant(SparsityConfig):
    """lambda0 from the first step."""

    schedule: str = "constant"

    def multiplier(self, progress: float) -> float:
        return 1.0


@register_sparsity("linear_warmup")
@dataclass
class LinearWarmup(SparsityConfig):
    """0 -> 1 over the first warmup_fraction of training, then a plateau (paper Figure 3b)."""

    schedule: str = "linear_warmup"
    warmup_fraction: float = 1.0  # share of steps spent rising

    def __post_init__(self) -> None:
        super().__post_init__()
        _fraction("warmup_fraction", self.warmup_fraction)

    def multiplier(self, progress: float) -> float:
        return min(1.0, progress / self.warmup_fraction) if self.warmup_fraction > 0 else 1.0


@register_sparsity("delayed_linear")
@dataclass
class DelayedLinear(SparsityConfig):
    """0 until delay_fraction, then linear to 1 at the end of training."""

    schedule: str = "delayed_linear"
    delay_fraction: float = 0.2  # share of steps at zero first

    def __post_init__(self) -> None:
        super().__post_init__()
        _fraction("delay_fraction", self.delay_fraction)

    def multiplier(self, progress: float) -> float:
        if progress <= self.delay_fraction:
            return 0.0
        return min(1.0, (progress - self.delay_fraction) / max(1e-12, 1.0 - self.delay_fraction))


@LR_SCHEDULES.register("constant")
def lr_constant(progress: float, final: float) -> float:
    """The peak lr after warm-up."""
    return 1.0


@LR_SCHEDULES.register("linear")
def lr_linear(progress: float, final: float) -> float:
    """Linear decay to lr * lr_final_fraction."""
    return 1.0 - (1.0 - final) * progress


@LR_SCHEDULES.register("cosine")
def lr_cosine(progress: float, final: float) -> float:
    """Cosine decay to lr * lr_final_fraction."""
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
