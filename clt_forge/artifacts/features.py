"""The feature database: one SQLite file per worker, merged into one store (docs/formats.md).

Tables (format "clt-forge/features", version 2):

    meta(key PRIMARY KEY, value)              JSON values: format, version, checkpoint, source,
                                              tokens, worker, hist_edges, context, display
                                              ({histogram_bins, quantiles} of the feature
                                              JSON export), scorer ("auroc"; "balanced_accuracy"
                                              in version 1), pass_done, finished
    features(layer, feature, PRIMARY KEY)     n_active, frequency, mean_act, max_act, histogram
                                              (JSON counts on meta.hist_edges), top_tokens,
                                              top_logits, bottom_logits (JSON), explanation,
                                              score, score_tpr, score_tnr, status,
                                              score_control, score_difference (version 2)
    examples(layer, feature, kind, rank, PK)  kind: top | sample | silent; position (global
                                              token index), value, center (index of that token
                                              in the lists), token_ids, tokens (decoded strings),
                                              acts (JSON lists over the context)

`status` moves collected -> explained -> scored (or done when explanations are off); a worker
that is killed and re-run skips the pass once `pass_done` is set and every feature already
past the step it would redo; `finished` marks a worker whose features are all done, and only
finished worker databases merge.

Version 2 (the scorer with a control) appended `score_control` and `score_difference` to the
features table; `score` became the AUROC of the judge's P(yes) (it was the balanced accuracy). A
version-1 database is upgraded in place when opened: the two columns are added (NULL) and
meta.scorer says "balanced_accuracy" for its old scores; read-only files are read as they are. Merging copies rows table by table through SQLite (ATTACH),
so it never holds a worker's database in memory.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clt_forge.errors import CLTError

__all__ = ["FORMAT", "VERSION", "FeatureStore", "merge_stores", "read_explanations"]

FORMAT = "clt-forge/features"
VERSION = 2
READABLE = (1, 2)  # version 1 is upgraded on open (`_upgrade_v1`)
V2_COLUMNS = {"score_control": "REAL", "score_difference": "REAL"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS features (
    layer INTEGER NOT NULL, feature INTEGER NOT NULL,
    n_active INTEGER NOT NULL, frequency REAL NOT NULL, mean_act REAL NOT NULL, max_act REAL NOT NULL,
    histogram TEXT NOT NULL, top_tokens TEXT NOT NULL, top_logits TEXT NOT NULL, bottom_logits TEXT NOT NULL,
    explanation TEXT, score REAL, score_tpr REAL, score_tnr REAL, status TEXT NOT NULL,
    score_control REAL, score_difference REAL,
    PRIMARY KEY (layer, feature));
CREATE TABLE IF NOT EXISTS examples (
    layer INTEGER NOT NULL, feature INTEGER NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL,
    position INTEGER NOT NULL, value REAL NOT NULL, center INTEGER NOT NULL, token_ids TEXT NOT NULL,
    tokens TEXT NOT NULL, acts TEXT NOT NULL, PRIMARY KEY (layer, feature, kind, rank));
"""
FEATURE_COLUMNS = [
    "layer",
    "feature",
    "n_active",
    "frequency",
    "mean_act",
    "max_act",
    "histogram",
    "top_tokens",
    "top_logits",
    "bottom_logits",
    "explanation",
    "score",
    "score_tpr",
    "score_tnr",
    "status",
    "score_control",
    "score_difference",
]
EXAMPLE_COLUMNS = ["layer", "feature", "kind", "rank", "position", "value", "center", "token_ids", "tokens", "acts"]


@dataclass
class Example:
    """One context window: its tokens (decoded strings) and the feature's activation on each."""

    tokens: list[str]
    acts: list[float]

    @property
    def max_act(self) -> float:
        return max(self.acts, default=0.0)


@dataclass
class FeatureEvidence:
    """What the streaming pass found for feature `feature` of layer `layer`."""

    layer: int
    feature: int
    top_examples: list[Example]  # highest activations first (shown to the explainer)
    top_tokens: list[tuple[str, int]] = field(default_factory=list)  # tokens it fires on most, with counts
    activating: list[Example] = field(default_factory=list)  # held-out firing contexts (scoring)
    non_activating: list[Example] = field(default_factory=list)  # contexts where it is silent (scoring)
    top_logits: list[str] = field(default_factory=list)  # tokens its decoder promotes
    frequency: float = 0.0  # share of tokens it fires on


class FeatureStore:
    """One feature database file (created on first open)."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise CLTError(f"no feature database at {self.path}: run `clt autointerp` first, or pass features=PATH.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        try:
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise CLTError(f"{self.path} is not a clt-forge feature database ({err}).") from None
        meta = self.meta()
        if meta.get("format", FORMAT) != FORMAT:
            raise CLTError(f"{self.path}: not a clt-forge feature database (format={meta['format']!r}).")
        if meta.get("version", VERSION) not in READABLE:
            raise CLTError(
                f"{self.path}: feature database version {meta['version']}; this clt-forge reads versions "
                f"{', '.join(map(str, READABLE))}."
            )
        if meta.get("version") == 1:
            self._upgrade_v1()

    def _upgrade_v1(self) -> None:
        """Version 1 -> 2: append the control columns; old scores were balanced accuracies."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(features)")}
        try:
            with self.db:
                for name, kind in V2_COLUMNS.items():
                    if name not in have:
                        self.db.execute(f"ALTER TABLE features ADD COLUMN {name} {kind}")
                self.db.executemany(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [("version", json.dumps(VERSION)), ("scorer", json.dumps("balanced_accuracy"))],
                )
        except sqlite3.OperationalError:  # a read-only file: readers use .get() for the new columns
            pass

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- meta ------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        return {key: json.loads(value) for key, value in self.db.execute("SELECT key, value FROM meta")}

    def set_meta(self, **values: Any) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()]
            )

    # ---- the pass's results (one transaction) ----------------------------------------------

    def write_pass(self, features: Iterable[dict[str, Any]], examples: Iterable[dict[str, Any]], **meta: Any) -> None:
        with self.db:
            self.db.execute("DELETE FROM features")
            self.db.execute("DELETE FROM examples")
            self.db.executemany(
                f"INSERT INTO features VALUES ({', '.join('?' * len(FEATURE_COLUMNS))})",
                (tuple(_cell(row.get(c)) for c in FEATURE_COLUMNS) for row in features),
            )
            self.db.executemany(
                f"INSERT INTO examples VALUES ({', '.join('?' * len(EXAMPLE_COLUMNS))})",
                (tuple(_cell(row[c]) for c in EXAMPLE_COLUMNS) for row in examples),
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [
                    (k, json.dumps(v))
                    for k, v in {**meta, "format": FORMAT, "version": VERSION, "pass_done": True}.items()
                ],
            )

    # ---- explanations and scores -----------------------------------------------------------

    def with_status(self, status: str) -> list[tuple[int, int]]:
        rows = self.db.execute(
            "SELECT layer, feature FROM features WHERE status = ? ORDER BY layer, feature", (status,)
        )
        return [(int(a), int(b)) for a, b in rows]

    def set_explanation(self, layer: int, feature: int, text: str, status: str = "explained") -> None:
        with self.db:
            self.db.execute(
                "UPDATE features SET explanation = ?, status = ? WHERE layer = ? AND feature = ?",
                (text, status, layer, feature),
            )

    def set_score(
        self, layer: int, feature: int, score: float, tpr: float, tnr: float, control: float | None = None
    ) -> None:
        """The explanation's score (and TPR / TNR at P(yes) > 0.5), its control's score (the same
        contexts judged with another feature's explanation), and score - control."""
        difference = None if control is None else score - control
        with self.db:
            self.db.execute(
                "UPDATE features SET score = ?, score_tpr = ?, score_tnr = ?, score_control = ?, "
                "score_difference = ?, status = 'scored' WHERE layer = ? AND feature = ?",
                (score, tpr, tnr, control, difference, layer, feature),
            )

    def set_status(self, status: str, old: str) -> None:
        with self.db:
            self.db.execute("UPDATE features SET status = ? WHERE status = ?", (status, old))

    # ---- reading ---------------------------------------------------------------------------

    def feature(self, layer: int, feature: int) -> dict[str, Any] | None:
        cursor = self.db.execute("SELECT * FROM features WHERE layer = ? AND feature = ?", (layer, feature))
        row = cursor.fetchone()
        if row is None:
            return None
        record = dict(zip([d[0] for d in cursor.description], row, strict=True))
        for key in ("histogram", "top_tokens", "top_logits", "bottom_logits"):
            record[key] = json.loads(record[key])
        return record

    def examples(self, layer: int, feature: int, kind: str) -> list[dict[str, Any]]:
        cursor = self.db.execute(
            "SELECT * FROM examples WHERE layer = ? AND feature = ? AND kind = ? ORDER BY rank", (layer, feature, kind)
        )
        names = [d[0] for d in cursor.description]
        out = []
        for row in cursor:
            record = dict(zip(names, row, strict=True))
            for key in ("token_ids", "tokens", "acts"):
                record[key] = json.loads(record[key])
            out.append(record)
        return out

    def features(self) -> Iterator[tuple[int, int]]:
        for layer, feature in self.db.execute("SELECT layer, feature FROM features ORDER BY layer, feature"):
            yield int(layer), int(feature)

    def evidence(self, layer: int, feature: int, held_out: set[int] | None = None) -> FeatureEvidence:
        """What the explainer and scorer read. Sampled firing contexts that are also top
        examples are left out of `activating`, so the scorer sees contexts the explainer did not."""
        record = self.feature(layer, feature)
        if record is None:
            raise CLTError(f"{self.path}: no feature ({layer}, {feature}).")
        top = self.examples(layer, feature, "top")
        top_positions = {e["position"] for e in top}
        sample = [e for e in self.examples(layer, feature, "sample") if e["position"] not in top_positions]
        return FeatureEvidence(
            layer=layer,
            feature=feature,
            top_examples=[Example(e["tokens"], e["acts"]) for e in top],
            top_tokens=[(str(t), int(c)) for t, c in record["top_tokens"]],
            activating=[Example(e["tokens"], e["acts"]) for e in sample],
            non_activating=[Example(e["tokens"], e["acts"]) for e in self.examples(layer, feature, "silent")],
            top_logits=list(record["top_logits"]),
            frequency=float(record["frequency"]),
        )

    def explanations(self) -> dict[tuple[int, int], str]:
        rows = self.db.execute("SELECT layer, feature, explanation FROM features WHERE explanation IS NOT NULL")
        return {(int(a), int(b)): str(c) for a, b, c in rows}

    def scores(self) -> list[float | None]:
        """Detection scores of every scored feature (None where there was nothing to score on:
        SQLite stores a NaN as NULL)."""
        return [
            s for (s,) in self.db.execute("SELECT score FROM features WHERE status = 'scored' ORDER BY layer, feature")
        ]

    def controls(self) -> list[float | None]:
        """The control scores of the features `scores()` lists, in the same order (None: none)."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(features)")}
        if "score_control" not in have:  # a read-only version-1 file
            return [None for _ in self.scores()]
        return [
            c
            for (c,) in self.db.execute(
                "SELECT score_control FROM features WHERE status = 'scored' ORDER BY layer, feature"
            )
        ]


def read_explanations(path: str | Path) -> dict[tuple[int, int], str]:
    """(layer, feature) -> explanation, from a feature database (for graph labels)."""
    with closing(FeatureStore(path, create=False)) as store:
        return store.explanations()


def merge_stores(parts: list[Path], out: Path) -> Path:
    """Combine per-worker databases (disjoint features) into `out`, row by row inside SQLite."""
    if not parts:
        raise CLTError("no worker databases to merge.")
    metas = []
    for part in parts:
        with closing(FeatureStore(part, create=False)) as store:
            meta = store.meta()
        if not meta.get("finished"):
            raise CLTError(f"worker database {part} is incomplete (that worker did not finish); re-run it.")
        metas.append(meta)
    scratch = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # two last workers may merge at once
    scratch.unlink(missing_ok=True)
    with closing(FeatureStore(scratch)) as merged:
        db = merged.db
        for i, part in enumerate(parts):
            db.execute("ATTACH DATABASE ? AS part", (str(part),))
            try:
                with db:
                    db.execute("INSERT INTO features SELECT * FROM part.features")
                    db.execute("INSERT INTO examples SELECT * FROM part.examples")
            except sqlite3.IntegrityError:
                raise CLTError(
                    f"{part} repeats features already merged from {parts[:i]}: workers must be disjoint."
                ) from None
            finally:
                db.execute("DETACH DATABASE part")
        first = {k: v for k, v in metas[0].items() if k not in ("worker", "pass_seconds")}
        merged.set_meta(**first, workers=[m.get("worker") for m in metas])
    scratch.replace(out)
    return out


def _cell(value: Any) -> Any:
    if isinstance(value, list | dict | tuple):
        return json.dumps(value)
    return value
