"""Registries: the one list of each choice users extend (quantizers, sparsity and lr schedules,
model sources, text sources, explainers). A new entry is one decorated class or function in any
module; the config value that selects it is validated against the registry's keys.

Every registry names the config key it serves (`quant.scheme`, `sparsity.schedule`, ...) and is
listed in `CHOICES` under that key once created, so `clt_forge.config.compose.validate` checks a
composed config against every registry loaded in the process, with the allowed values listed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from clt_forge.errors import ConfigError

V = TypeVar("V")

CHOICES: dict[str, Registry[Any]] = {}  # config key -> the registry its value names


class Registry(dict[str, V], Generic[V]):
    """name -> implementation, for the config value at `key` (e.g. "quant.scheme")."""

    def __init__(self, key: str, extra: tuple[str, ...] = ()) -> None:
        """`extra`: values the key also accepts that need no entry (explainer.kind=none)."""
        super().__init__()
        self.key, self.extra = key, extra
        CHOICES[key] = self

    def register(self, name: str) -> Callable[[V], V]:
        """Decorator: `@REGISTRY.register(name)` stores the decorated object under `name`."""

        def add(value: V) -> V:
            if name in self or name in self.extra:
                raise ValueError(f"{self.key} '{name}' is already registered ({self.get(name, 'built in')!r})")
            self[name] = value
            return value

        return add

    def allowed(self) -> list[str]:
        return sorted({*self, *self.extra})

    def message(self, value: object) -> str:
        """What is wrong with `value`, naming the key and every allowed value."""
        return f"invalid value '{value}' for {self.key}. Allowed values for {self.key}: {', '.join(self.allowed())}"

    def lookup(self, name: str) -> V:
        """The entry registered under `name`; a ConfigError listing the allowed values if none is."""
        if name not in self:
            raise ConfigError(self.message(name))
        return self[name]
