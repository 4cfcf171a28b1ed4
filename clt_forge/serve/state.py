"""What `clt serve` draws and shows: views of graphs, their drawings, node panels.

A `View` is everything one drawing depends on (graph file, pruning thresholds, collapsed or
not, clusters, links drawn); its `key` (JSON text) travels between the page, the routes and
the caches. `ServeState` holds what the callbacks share: the graph library, a pruner per graph,
the feature sources and the intervention queue; drawings are cached per view.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clt_forge.artifacts.graph import ERROR, FEATURE, Cluster, GraphDocument, from_supernodes, parse_node
from clt_forge.errors import CLTError
from clt_forge.serve.clusters import collapse
from clt_forge.serve.features import FeatureSource, open_features
from clt_forge.serve.graphs import GraphLibrary
from clt_forge.serve.jobs import InterventionQueue
from clt_forge.serve.layout import elements, extent, grid
from clt_forge.serve.panel import empty_panel, node_panel
from clt_forge.serve.pruning import GraphView, Pruner

__all__ = [
    "DEFAULT_MAX_LINKS",
    "DEFAULT_THRESHOLDS",
    "ServeState",
    "View",
    "draw",
    "find_node",
    "graph_meta",
    "links_param",
    "panel_html",
    "saved_thresholds",
    "warm_up",
]

DEFAULT_THRESHOLDS = (0.8, 0.98)
DEFAULT_MAX_LINKS = 2000


@dataclass(frozen=True)
class View:
    """What one drawing of a graph depends on; `key` is its JSON text, which the page, the
    routes and the caches share."""

    name: str
    node_threshold: float
    edge_threshold: float
    collapsed: bool = False
    supernodes: tuple[tuple[str, ...], ...] = ()
    max_links: int = DEFAULT_MAX_LINKS  # 0: every link

    @property
    def key(self) -> str:
        return json.dumps(
            [
                self.name,
                self.node_threshold,
                self.edge_threshold,
                self.collapsed,
                [list(g) for g in self.supernodes],
                self.max_links,
            ]
        )

    @classmethod
    def parse(cls, key: str) -> View:
        """The view of a key sent by the page; ValueError when it is not one."""
        try:
            name, node_t, edge_t, collapsed, supernodes, max_links = json.loads(key)
            return cls.of(str(name), float(node_t), float(edge_t), bool(collapsed), supernodes, int(max_links))
        except (TypeError, ValueError) as err:
            raise ValueError(f"not a view key: {key[:200]!r}") from err

    @classmethod
    def of(cls, name: str, node_t: float, edge_t: float, collapsed: Any, supernodes: Any, max_links: Any) -> View:
        groups = tuple(tuple(str(x) for x in group) for group in (supernodes or []))
        return cls(name, float(node_t), float(edge_t), bool(collapsed), groups, int(max_links or 0))

    @property
    def clusters(self) -> list[Cluster]:
        return from_supernodes([list(g) for g in self.supernodes])


def draw(state: ServeState, view: View) -> dict[str, Any]:
    """Cytoscape elements of `view`, with counts, the model extent and a one-line summary.

    At most `view.max_links` links are drawn (the strongest): on a CPU-rendered canvas each
    frame costs about 25 ms per thousand links."""
    document = state.document(view.name)
    pruned = state.view(view.name, view.node_threshold, view.edge_threshold)
    clusters = view.clusters
    layout = grid(pruned.nodes, document.n_layers, len(document.prompt_tokens))
    nodes, links = collapse(pruned, clusters) if view.collapsed else (pruned.nodes, pruned.links)
    drawn = links
    if view.max_links and len(links) > view.max_links:
        drawn = sorted(links, key=lambda link: -abs(link["weight"]))[: view.max_links]
    shown = elements(
        nodes, drawn, layout, n_layers=document.n_layers, prompt_tokens=document.prompt_tokens, clusters=clusters
    )
    how = (
        "re-pruned from the raw graph" if pruned.exact else "pruned from the saved links (no raw graph beside the file)"
    )
    count = f"{len(drawn):,} of {len(links):,} links drawn" if len(drawn) < len(links) else f"{len(links):,} links"
    note = f"{len(nodes):,} nodes · {count} · {how}"
    return {"elements": shown, "nodes": len(nodes), "edges": len(drawn), "extent": extent(layout), "note": note}


def graph_meta(state: ServeState, view: View) -> tuple[dict[str, Any], str]:
    """What the page needs to fetch and check a drawing (assets/serve.js), and its summary."""
    drawing = state.drawing(view)
    return {"key": view.name, "view": view.key, "nodes": drawing["nodes"], "edges": drawing["edges"]}, drawing["note"]


def panel_html(state: ServeState, shown: View, node_id: str) -> str:
    """The node panel (panel.py) of `node_id` as drawn in `shown`."""
    name = shown.name
    document = state.document(name)
    view = state.view(name, shown.node_threshold, shown.edge_threshold)
    node = find_node(view, node_id, shown.clusters)
    if node is None:
        return empty_panel(f"{node_id} is not in the graph at these thresholds.")
    feature, note, magnitude = None, None, None
    if node["feature_type"] == FEATURE:
        source, note = state.features(document)
        if source is not None:
            layer, _, index = parse_node(node).layer_pos_feature
            feature = source.feature(layer, index)
            note = None if feature is not None else f"Feature ({layer}, {index}) is not in {source.path}."
    elif node["feature_type"] == ERROR:
        magnitude = state.pruner(name).error_magnitudes().get(node_id)
    return node_panel(
        node,
        view=view,
        prompt_tokens=document.prompt_tokens,
        feature=feature,
        features_note=note,
        error_magnitude=magnitude,
    )


class ServeState:
    """What the callbacks share: the graphs, their pruners, feature sources and the job queue."""

    def __init__(
        self,
        library: GraphLibrary,
        jobs: InterventionQueue,
        features_path: str | Path | None = None,
        checkpoint: str | Path | None = None,
    ) -> None:
        self.library = library
        self.jobs = jobs
        self.features_override = open_features(features_path) if features_path else None
        self.checkpoint_override = str(checkpoint) if checkpoint else None
        self._sources: dict[str, FeatureSource | str] = {}
        self._pruners: dict[str, tuple[GraphDocument, Pruner]] = {}
        self._drawings: dict[View, tuple[GraphDocument, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._loading = threading.Lock()  # one Pruner per graph version, so its raw graph loads once

    def document(self, name: str) -> GraphDocument:
        return self.library.load(name)

    def features(self, document: GraphDocument) -> tuple[FeatureSource | None, str | None]:
        """The graph's feature source and, when there is none, why."""
        if self.features_override is not None:
            return self.features_override, None
        recorded = document.metadata.get("features")
        if not recorded:
            return None, "This graph records no feature database: start clt serve with features=PATH."
        if recorded not in self._sources:
            try:
                self._sources[recorded] = open_features(recorded) or "no features"
            except CLTError as err:
                self._sources[recorded] = f"{err} Start clt serve with features=PATH."
        source = self._sources[recorded]
        return (None, source) if isinstance(source, str) else (source, None)

    def checkpoint(self, document: GraphDocument) -> str | None:
        return self.checkpoint_override or document.metadata.get("checkpoint")

    def pruner(self, name: str) -> Pruner:
        """The pruner of the graph's current version (clusters saved by us keep the same version)."""
        document = self.document(name)
        with self._loading:
            cached = self._pruners.get(name)
            if cached is None or cached[0] is not document:
                raw = self.library.sibling(document, document.metadata.get("raw_graph") or "")
                source = self.features(document)[0]
                pruner = Pruner(document, raw, source.explanation if source else None)
                cached = self._pruners[name] = (document, pruner)
        return cached[1]

    def view(self, name: str, node_threshold: float, edge_threshold: float) -> GraphView:
        return self.pruner(name).view(node_threshold, edge_threshold)

    def drawing(self, view: View) -> dict[str, Any]:
        """draw(self, view), remembered for the last few views (the callbacks and routes all ask)."""
        document = self.document(view.name)
        with self._lock:
            cached = self._drawings.pop(view, None)
        if cached is None or cached[0] is not document:
            cached = (document, draw(self, view))
        with self._lock:
            self._drawings[view] = cached
            while len(self._drawings) > 8:
                self._drawings.pop(next(iter(self._drawings)))
        return cached[1]


def warm_up(state: ServeState) -> None:
    """Draw the first graph once (loading and re-pruning its raw graph), so the first page is quick."""
    try:
        name = state.library.first()
        document = state.document(name)
        state.drawing(View.of(name, *saved_thresholds(document), False, document.supernodes, DEFAULT_MAX_LINKS))
    except CLTError:
        pass  # the page will show the problem


def links_param(text: str) -> int:
    """The `links=N` of a page address: at most N links drawn, 0 for all (default 2,000)."""
    return int(text) if text.isdigit() else DEFAULT_MAX_LINKS


def saved_thresholds(document: GraphDocument) -> tuple[float, float]:
    settings = document.metadata.get("pruning_settings") or {}
    node = settings.get("node_threshold", document.metadata.get("node_threshold", DEFAULT_THRESHOLDS[0]))
    return float(node), float(settings.get("edge_threshold", DEFAULT_THRESHOLDS[1]))


def find_node(view: GraphView, node_id: str, clusters: list[Cluster]) -> dict[str, Any] | None:
    if node_id.startswith("cluster:"):
        nodes, _ = collapse(view, clusters)
        return next((n for n in nodes if n["node_id"] == node_id), None)
    return view.by_id.get(node_id)
