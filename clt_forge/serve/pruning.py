"""Re-pruning a graph at the thresholds the sliders ask for.

With the raw graph (`metadata.raw_graph`, circuit-tracer's unpruned `Graph` beside the JSON)
pruning is exact: circuit-tracer's `prune_graph` through the same `graph_json` that
`clt attribute` uses, so the nodes and links are what `clt attribute` would have written at
those thresholds. Without it, the JSON's own nodes and links are pruned further: feature and
error nodes whose cumulative influence (`influence`) exceeds the node threshold are dropped,
then the strongest links are kept until they carry `edge_threshold` of the total |weight|.
Results are cached per (node threshold, edge threshold) rounded to 0.005.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clt_forge.artifacts.graph import (
    EMBEDDING,
    ERROR,
    FEATURE,
    LOGIT,
    GraphDocument,
    error_node_id,
    graph_json,
    parse_node,
)

__all__ = ["GraphView", "Pruner"]


@dataclass
class GraphView:
    """The nodes and links shown at one pair of thresholds."""

    nodes: list[dict[str, Any]]
    links: list[dict[str, Any]]
    exact: bool  # re-pruned from the raw graph (True) or from the JSON's links (False)

    def __post_init__(self) -> None:
        self.by_id = {node["node_id"]: node for node in self.nodes}


class _Tokens:
    """Stands in for the tokenizer `graph_json` decodes prompt tokens with: the JSON has them."""

    def __init__(self, ids: list[int], tokens: list[str]) -> None:
        self.strings = dict(zip(ids, tokens, strict=False))

    def decode(self, ids: list[int]) -> str:
        return self.strings.get(int(ids[0]), f"<{int(ids[0])}>")


class Pruner:
    """Prunes one graph document at any thresholds (see the module docstring)."""

    def __init__(
        self, document: GraphDocument, raw_path: Path | None, explain: Callable[[int, int], str | None] | None = None
    ) -> None:
        self.document = document
        self.raw_path = raw_path
        self.explain = explain  # (layer, feature) -> explanation, for nodes the saved JSON lacks
        self.labels: dict[tuple[int, int], str] = {}
        for node in document.nodes:
            if node["feature_type"] == FEATURE and node.get("clerp"):
                layer, _, feature = parse_node(node).layer_pos_feature
                self.labels[layer, feature] = node["clerp"]
        self._raw: Any = None
        self._lock = threading.Lock()
        self._views = functools.lru_cache(maxsize=16)(self._prune)

    @property
    def exact(self) -> bool:
        return self.raw_path is not None

    def view(self, node_threshold: float, edge_threshold: float) -> GraphView:
        return self._views(round(node_threshold * 200) / 200, round(edge_threshold * 200) / 200)

    def _prune(self, node_threshold: float, edge_threshold: float) -> GraphView:
        if self.raw_path is None:
            return _prune_json(self.document, node_threshold, edge_threshold)
        with self._lock:
            raw = self._load_raw()
            document = graph_json(
                raw,
                _Tokens(self.document.metadata.get("prompt_token_ids", []), self.document.prompt_tokens),
                slug=self.document.slug,
                node_threshold=node_threshold,
                edge_threshold=edge_threshold,
                labels=self.labels,
            )
        return GraphView(document["nodes"], document["links"], exact=True)

    def _load_raw(self) -> Any:
        if self._raw is None:
            self._raw = load_raw_graph(self.raw_path)  # type: ignore[arg-type]
            if self.explain is not None:
                selected = self._raw.active_features[self._raw.selected_features]
                for layer, _, feature in selected.tolist():
                    if (layer, feature) not in self.labels:
                        self.labels[layer, feature] = self.explain(layer, feature) or ""
        return self._raw

    def error_magnitudes(self) -> dict[str, float]:
        """Error node id -> sum of |direct effects| out of it (the raw graph's, else the JSON's links)."""
        if self.raw_path is None:
            out: dict[str, float] = {}
            kinds = {n["node_id"]: n["feature_type"] for n in self.document.nodes}
            for link in self.document.links:
                if kinds[link["source"]] == ERROR:
                    out[link["source"]] = out.get(link["source"], 0.0) + abs(link["weight"])
            return out
        with self._lock:
            raw = self._load_raw()
        n_features, n_pos = len(raw.selected_features), raw.n_pos
        totals = raw.adjacency_matrix[:, n_features : n_features + raw.cfg.n_layers * n_pos].abs().sum(0)
        return {error_node_id(*divmod(i, n_pos)): float(v) for i, v in enumerate(totals.tolist())}


def load_raw_graph(path: Path) -> Any:
    """circuit-tracer's Graph from `Graph.to_pt`, unpickled with torch's weights-only loader
    (only tensors and the two circuit-tracer classes such a file holds are allowed)."""
    import torch
    from circuit_tracer.attribution.targets import LogitTarget
    from circuit_tracer.graph import Graph
    from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

    # Added for good, not with the safe_globals() context manager: that one is process-wide
    # state undone on exit, so two threads loading graphs at once broke each other.
    torch.serialization.add_safe_globals([UnifiedConfig, LogitTarget])
    fields = torch.load(path, weights_only=True, map_location="cpu")
    return Graph(**fields)


def _prune_json(document: GraphDocument, node_threshold: float, edge_threshold: float) -> GraphView:
    """Prune the saved graph further; at or above its recorded thresholds it is shown as saved."""
    recorded = document.metadata.get("pruning_settings", {})
    always = (EMBEDDING, LOGIT)
    node_limit = node_threshold if node_threshold < recorded.get("node_threshold", 1.0) else float("inf")
    kept = {
        node["node_id"]
        for node in document.nodes
        if node["feature_type"] in always or node.get("influence") is None or node["influence"] <= node_limit
    }
    links = [link for link in document.links if link["source"] in kept and link["target"] in kept]
    links.sort(key=lambda link: -abs(link["weight"]))
    share = edge_threshold if edge_threshold < recorded.get("edge_threshold", 1.0) else 1.0
    total = sum(abs(link["weight"]) for link in links)
    chosen, carried = [], 0.0
    for link in links:
        if share < 1.0 and carried >= share * total:
            break
        chosen.append(link)
        carried += abs(link["weight"])
    connected = {end for link in chosen for end in (link["source"], link["target"])}
    nodes = [
        n for n in document.nodes if n["node_id"] in kept and (n["feature_type"] in always or n["node_id"] in connected)
    ]
    shown = {n["node_id"] for n in nodes}
    return GraphView(
        nodes, [link for link in chosen if link["source"] in shown and link["target"] in shown], exact=False
    )
