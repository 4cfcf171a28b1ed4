"""Clusters (supernodes): grouping nodes, collapsing them, saving them into the graph file.

A cluster is saved as Neuronpedia does, in the graph JSON's `qParams.supernodes`: a list of
`[name, node_id, node_id, ...]` lists. A node belongs to at most one cluster; members that
the current thresholds prune away stay in the cluster. Saving rewrites only
`qParams.supernodes` of the file as it is on disk now, through a temporary file in the same
folder and an atomic rename, so the user's file is never left half-written.

Collapsing replaces each cluster's visible members by one node and sums the weights of the
links between groups (links inside a cluster are dropped), which is how the paper's
supernode diagrams read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clt_forge.serve.graphs import FEATURE, GraphDocument
from clt_forge.serve.pruning import GraphView, feature_key

__all__ = [
    "Cluster",
    "add_cluster",
    "collapse",
    "feature_members",
    "remove_cluster",
    "save_clusters",
    "subgraph",
    "to_supernodes",
]

_SAVE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Cluster:
    name: str
    members: tuple[str, ...]  # node ids


def from_supernodes(supernodes: list[list[str]]) -> list[Cluster]:
    return [Cluster(group[0], tuple(group[1:])) for group in supernodes if group]


def to_supernodes(clusters: list[Cluster]) -> list[list[str]]:
    return [[c.name, *c.members] for c in clusters]


def add_cluster(clusters: list[Cluster], name: str, members: list[str]) -> list[Cluster]:
    """A new cluster (or a replacement for the one of the same name); its members leave other clusters."""
    name = name.strip()
    if not name:
        raise ValueError("a cluster needs a name")
    if not members:
        raise ValueError("select the nodes of the cluster first (shift+click, or shift+drag a box)")
    taken = set(members)
    kept = [Cluster(c.name, tuple(m for m in c.members if m not in taken)) for c in clusters if c.name != name]
    return [c for c in kept if c.members] + [Cluster(name, tuple(dict.fromkeys(members)))]


def remove_cluster(clusters: list[Cluster], name: str) -> list[Cluster]:
    return [c for c in clusters if c.name != name]


def save_clusters(document: GraphDocument, clusters: list[Cluster]) -> None:
    """Write `clusters` into the graph file's qParams.supernodes (temporary file + atomic rename).

    Everything else in the file is written back as it was read; a file that fails to write
    leaves the original untouched and the temporary file removed."""
    path = document.path
    with _SAVE_LOCK:
        data = document.data
        previous = data.get("qParams")
        data["qParams"] = dict(previous or {}, supernodes=to_supernodes(clusters))
        handle, scratch = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "w") as out:
                json.dump(data, out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            shutil.copymode(path, scratch)
            os.replace(scratch, path)
        except BaseException:
            Path(scratch).unlink(missing_ok=True)
            if previous is None:
                data.pop("qParams")
            else:
                data["qParams"] = previous
            raise


def feature_members(cluster: Cluster) -> list[tuple[int, int, int]]:
    """(layer, position, feature) of the cluster's CLT feature members (others cannot be edited)."""
    out = []
    for node_id in cluster.members:
        parts = node_id.split("_")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            layer, feature, pos = feature_key(node_id)
            out.append((layer, pos, feature))
    return out


def collapse(view: GraphView, clusters: list[Cluster]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Nodes and links with every cluster's visible members merged into one node.

    A cluster node is `{"node_id": "cluster:NAME", "feature_type": "cluster", "members": [...]}`;
    links between two groups carry the sum of the weights of the links they replace."""
    group: dict[str, str] = {}
    nodes: list[dict[str, Any]] = []
    for cluster in clusters:
        visible = [m for m in cluster.members if m in view.by_id]
        if not visible:
            continue
        cluster_id = f"cluster:{cluster.name}"
        for member in visible:
            group[member] = cluster_id
        nodes.append({"node_id": cluster_id, "feature_type": "cluster", "clerp": cluster.name, "members": visible})
    nodes = [n for n in view.nodes if n["node_id"] not in group] + nodes
    weights: dict[tuple[str, str], float] = {}
    for link in view.links:
        source, target = group.get(link["source"], link["source"]), group.get(link["target"], link["target"])
        if source != target:
            weights[source, target] = weights.get((source, target), 0.0) + link["weight"]
    links = [{"source": s, "target": t, "weight": w} for (s, t), w in weights.items()]
    return nodes, links


def subgraph(document: GraphDocument, view: GraphView, keep: list[str], clusters: list[Cluster]) -> dict[str, Any]:
    """A graph JSON of the nodes `keep` (cluster ids expand to their members) and the links among them.

    Embedding and logit nodes stay, so the subgraph still reads from the prompt to the output."""
    wanted: set[str] = set()
    named = {f"cluster:{c.name}": c for c in clusters}
    for node_id in keep or list(view.by_id):
        wanted.update(named[node_id].members if node_id in named else [node_id])
    nodes = [n for n in view.nodes if n["node_id"] in wanted or n["feature_type"] in ("embedding", "logit")]
    ids = {n["node_id"] for n in nodes}
    links = [link for link in view.links if link["source"] in ids and link["target"] in ids]
    kept_clusters = [Cluster(c.name, tuple(m for m in c.members if m in ids)) for c in clusters]
    metadata = dict(document.metadata, slug=f"{document.slug}-subgraph", subgraph_of=document.slug)
    q_params = dict(document.data.get("qParams", {}))
    q_params.update(
        supernodes=to_supernodes([c for c in kept_clusters if c.members]),
        pinnedIds=[n["node_id"] for n in nodes if n["feature_type"] == FEATURE],
    )
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}
