"""A registry: a dict filled by a decorator, for the things users extend (model loaders, text
sources, sparsity schedules, ...). A new entry is one decorated function in any module."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Registry(dict[K, V], Generic[K, V]):
    def register(self, key: K) -> Callable[[V], V]:
        """Decorator: `@REGISTRY.register(key)` stores the decorated object under `key`."""

        def add(value: V) -> V:
            self[key] = value
            return value

        return add
