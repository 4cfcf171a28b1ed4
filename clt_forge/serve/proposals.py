"""Proposed clusters: groups of features that act as one, each with a suggested name.

Candidates are the pinned CLT features when at least two are pinned, else the TOP features
of the view by influence (circuit-tracer's cumulative influence: smallest first). A feature's
effect is the vector of the weights of its links out to every node of the view (the
downstream features and error nodes and the logits): two features with the same role push
the same nodes the same way. Features are grouped when they sit at the same token position
and their effects have a cosine similarity of at least THRESHOLD with every other member
(complete linkage: the two groups whose least similar pair is most similar merge first, until
no such pair reaches THRESHOLD). Each group of two or more is proposed, strongest first, with
the words most of its members' labels share as its name (stop words dropped; the first
member's label when they share none). The user accepts (with the name edited or not) or
rejects each proposal in the page; nothing is saved until accepted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from clt_forge.artifacts.graph import FEATURE, Cluster
from clt_forge.serve.pruning import GraphView

__all__ = ["THRESHOLD", "TOP", "Proposal", "propose", "suggest_name"]

THRESHOLD = 0.8
TOP = 30
STOP = {"a", "an", "the", "of", "in", "on", "to", "and", "or", "for", "with", "is", "at", "by", "as", "from"}


@dataclass(frozen=True)
class Proposal:
    name: str
    members: tuple[str, ...]
    similarity: float  # the least cosine similarity between two members' effects

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "members": list(self.members), "similarity": round(self.similarity, 3)}


def _effects(view: GraphView, candidates: list[str]) -> dict[str, dict[str, float]]:
    wanted = set(candidates)
    out: dict[str, dict[str, float]] = {c: {} for c in candidates}
    for link in view.links:
        if link["source"] in wanted:
            row = out[link["source"]]
            row[link["target"]] = row.get(link["target"], 0.0) + float(link["weight"])
    return out


def _cosine(a: dict[str, float], b: dict[str, float]) -> float:
    norm = math.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values()))
    return sum(v * b.get(k, 0.0) for k, v in a.items()) / norm if norm else 0.0


def suggest_name(labels: list[str]) -> str:
    """Words most labels share (in the first label's order), else the first label."""
    words = [[w for w in re.findall(r"[\w'’-]+", label.lower()) if w not in STOP] for label in labels]
    counts: dict[str, int] = {}
    for bag in words:
        for w in set(bag):
            counts[w] = counts.get(w, 0) + 1
    shared = [w for w in dict.fromkeys(words[0] if words else []) if counts[w] * 2 > len(labels) and not w.isdigit()]
    name = " ".join(shared[:4]) or (labels[0] if labels else "")
    return name.strip() or "proposed cluster"


def propose(
    view: GraphView, pinned: list[str], clusters: list[Cluster], threshold: float = THRESHOLD
) -> list[Proposal]:
    """Proposed groups among the pinned (or most influential) features; see the module docstring."""
    features = [n for n in view.nodes if n["feature_type"] == FEATURE]
    chosen = [n for n in features if n["node_id"] in set(pinned)]
    if len(chosen) < 2:
        chosen = sorted(features, key=lambda n: n.get("influence") or 0.0)[:TOP]
    effects = _effects(view, [n["node_id"] for n in chosen])
    by_pos: dict[int, list[str]] = {}
    for node in chosen:
        if effects[node["node_id"]]:
            by_pos.setdefault(node["ctx_idx"], []).append(node["node_id"])
    groups: list[tuple[list[str], float]] = []
    for ids in by_pos.values():
        groups += _complete_linkage(ids, effects, threshold)
    taken = {c.name for c in clusters}
    out = []
    for members, similarity in sorted(groups, key=lambda g: (-len(g[0]), -g[1])):
        name = suggest_name([str(view.by_id[m].get("clerp") or "") for m in members])
        while name in taken:
            name += "′"
        taken.add(name)
        out.append(Proposal(name, tuple(members), similarity))
    return out


def _complete_linkage(
    ids: list[str], effects: dict[str, dict[str, float]], threshold: float
) -> list[tuple[list[str], float]]:
    """Groups of two or more of `ids` whose members' effects are all >= threshold alike."""
    sim = {(a, b): _cosine(effects[a], effects[b]) for a in ids for b in ids if a < b}

    def pair(a: str, b: str) -> float:
        return sim[(a, b) if a < b else (b, a)]

    groups = [([i], 1.0) for i in ids]
    while len(groups) > 1:
        best, where = threshold, None
        for x in range(len(groups)):
            for y in range(x + 1, len(groups)):
                least = min(pair(a, b) for a in groups[x][0] for b in groups[y][0])
                if least >= best:
                    best, where = least, (x, y)
        if where is None:
            break
        x, y = where
        merged = (groups[x][0] + groups[y][0], min(best, groups[x][1], groups[y][1]))
        groups = [g for i, g in enumerate(groups) if i not in (x, y)] + [merged]
    return [g for g in groups if len(g[0]) > 1]
