"""What the node panel shows about a CLT feature, from a feature database or feature files.

Both sources answer with circuit-tracer's feature JSON shape (clt_forge/artifacts/feature_json.py):
explanation, detection_score, activation_frequency, examples_quantiles (top activations
first, each example with tokens, tokens_acts_list, train_token_ind), histogram (equal bins over
[0, act_max]), top_logits and bottom_logits.

- a feature database (`clt autointerp`'s SQLite file) is opened read-only, so serving never
  writes to it;
- a folder of feature files (`clt autointerp export=DIR`) is read by the file name the id
  gives, `{cantor(layer, feature)}.json`, so no other file in it is ever opened.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Protocol

from clt_forge.artifacts.feature_json import cantor, feature_json
from clt_forge.artifacts.features import FORMAT, VERSION, FeatureStore
from clt_forge.errors import CLTError

__all__ = ["FeatureSource", "open_features"]


class FeatureSource(Protocol):
    path: Path

    def feature(self, layer: int, feature: int) -> dict[str, Any] | None: ...

    def explanation(self, layer: int, feature: int) -> str | None: ...


class _ReadOnlyStore(FeatureStore):
    """A FeatureStore on a read-only SQLite connection (shared by the server's threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        try:
            meta = self.meta()
        except sqlite3.DatabaseError as err:
            raise CLTError(f"features={path}: not a clt-forge feature database ({err}).") from None
        if meta.get("format", FORMAT) != FORMAT or meta.get("version", VERSION) != VERSION:
            raise CLTError(
                f"features={path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                f"this clt-forge reads {FORMAT!r} version {VERSION}."
            )


class DatabaseFeatures:
    """Features from a `clt autointerp` database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = _ReadOnlyStore(path)
        self._lock = threading.Lock()
        self._cached = functools.lru_cache(maxsize=4096)(self._read)

    def feature(self, layer: int, feature: int) -> dict[str, Any] | None:
        return self._cached(layer, feature)

    def _read(self, layer: int, feature: int) -> dict[str, Any] | None:
        with self._lock:
            try:
                return feature_json(self.store, layer, feature)
            except KeyError:
                return None

    def explanation(self, layer: int, feature: int) -> str | None:
        with self._lock:
            row = self.store.db.execute(
                "SELECT explanation FROM features WHERE layer = ? AND feature = ?", (layer, feature)
            ).fetchone()
        return row[0] if row else None


class FileFeatures:
    """Features from a folder of circuit-tracer feature files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cached = functools.lru_cache(maxsize=4096)(self._read)

    def feature(self, layer: int, feature: int) -> dict[str, Any] | None:
        return self._cached(layer, feature)

    def _read(self, layer: int, feature: int) -> dict[str, Any] | None:
        file = self.path / f"{cantor(layer, feature)}.json"
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def explanation(self, layer: int, feature: int) -> str | None:
        return (self.feature(layer, feature) or {}).get("explanation")


def open_features(path: str | Path | None) -> FeatureSource | None:
    """A database file or a folder of feature files; None when no path is given."""
    if not path:
        return None
    path = Path(path).expanduser()
    if path.is_dir():
        return FileFeatures(path)
    if path.is_file():
        return DatabaseFeatures(path)
    raise CLTError(f"features={path}: no feature database or folder of feature files there (run `clt autointerp`).")
