"""Editing clusters in `clt serve`: making and removing them, collapsing them, exporting a subgraph.

A cluster is the graph artifact's `Cluster` (`clt_forge.artifacts.graph`: a name and node
ids, saved in the file's `qParams.supernodes` by `save_clusters`). A node belongs to at most
one cluster; members that the current thresholds prune away stay in the cluster.

Collapsing replaces each cluster's visible members by one node and sums the weights of the
links between groups (links inside a cluster are dropped), which is how the paper's
supernode diagrams read.
"""

from __future__ import annotations

from typing import Any

from clt_forge.artifacts.graph import EMBEDDING, FEATURE, LOGIT, Cluster, GraphDocument, to_supernodes
from clt_forge.serve.pruning import GraphView

__all__ = ["add_cluster", "collapse", "remove_cluster", "subgraph"]


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
    nodes = [n for n in view.nodes if n["node_id"] in wanted or n["feature_type"] in (EMBEDDING, LOGIT)]
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
