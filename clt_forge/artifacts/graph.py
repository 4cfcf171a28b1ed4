"""The graph JSON (Neuronpedia schema): node ids and kinds, writing from a circuit-tracer `Graph`,
reading with a version check, and clusters (`qParams.supernodes`).

Writer (`graph_json`) and readers (`clt serve`, `attribution/labels.py`) share this module:
nothing else builds or splits a node id. Reading needs neither torch nor circuit-tracer
(they are imported by `graph_json` when it runs), so `clt serve` opens graphs cheaply.

The output has circuit-tracer's `create_graph_files` shape (metadata, qParams, nodes, links;
node fields node_id, feature, layer, ctx_idx, feature_type, jsNodeId, clerp, influence,
activation, ...) and validates against Neuronpedia's graph schema, with these differences:

- error node ids as upstream circuit-tracer now writes them: "L_-1_p" for (layer L, position
  p) (jsNodeId "L_-1-p"); circuit-tracer 0.5.0, which we attribute with, names it "0_L_p",
  also the id of layer-0 feature L at p, so the two nodes' edges would merge. All other ids
  are circuit-tracer's (graph_nodes.py writes and parses them; they are re-exported here);
- feature labels (`clerp`) come from a mapping (layer, feature) -> explanation, normally
  the `clt autointerp` database;
- no tokenizer download: tokens are decoded with the tokenizer we already hold;
- metadata also records the replacement and completeness scores, the generation and pruning
  settings, and where the raw graph, checkpoint and feature database are, so `clt serve`
  can re-prune and intervene from the JSON alone.

`metadata.schema_version` is SCHEMA_VERSION (2); a reader refuses a file of another (newer)
version, naming the file and the version. Version 1 (a file without the field is version 1,
Neuronpedia's default) is read and upgraded in memory: its error ids, "err_L_p" as clt-forge
wrote them (or circuit-tracer 0.5.0's "0_L_p" where no feature has that id), are renamed to
"L_-1_p" in nodes, links and qParams (`upgrade_v1`), and the document says version 2, so a
file saved back (clusters) is a version-2 file. Clusters are saved as Neuronpedia saves
supernodes: `[name, node_id, ...]` lists; pinned nodes as `qParams.pinnedIds`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clt_forge.artifacts.graph_nodes import (
    EMBEDDING,
    ERROR,
    FEATURE,
    LOGIT,
    NodeId,
    NodeKind,
    embedding_node_id,
    error_node_id,
    feature_node_id,
    legacy_error_node_id,
    logit_node_id,
    parse_node,
    parse_node_id,
    upgrade_v1,
)
from clt_forge.errors import CLTError

if TYPE_CHECKING:
    import torch
    from circuit_tracer.graph import Graph

__all__ = [
    "EMBEDDING",
    "ERROR",
    "FEATURE",
    "LOGIT",
    "SCHEMA_VERSION",
    "Cluster",
    "GraphDocument",
    "GraphFileError",
    "NodeId",
    "NodeKind",
    "embedding_node_id",
    "error_node_id",
    "feature_node_id",
    "from_supernodes",
    "graph_json",
    "legacy_error_node_id",
    "logit_node_id",
    "parse_node",
    "parse_node_id",
    "read_graph",
    "save_clusters",
    "save_q_params",
    "to_supernodes",
    "upgrade_v1",
]

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: upgraded on read (upgrade_v1)
MAX_BYTES = 512 * 1024 * 1024  # a graph JSON larger than this is refused rather than parsed


# ---- clusters (qParams.supernodes) ------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """A named group of graph nodes (Neuronpedia's supernode), saved in `qParams.supernodes`
    as `[name, node_id, ...]`; members pruned away at the current thresholds stay in it."""

    name: str
    members: tuple[str, ...]  # node ids

    def features(self, n_layers: int) -> list[NodeId]:
        """The members that are CLT features (the ones an intervention can edit), parsed."""
        out = []
        for node_id in self.members:
            try:
                parsed = parse_node_id(node_id, n_layers)
            except ValueError:
                continue
            if parsed.kind is FEATURE:
                out.append(parsed)
        return out


def from_supernodes(supernodes: list[list[str]]) -> list[Cluster]:
    return [Cluster(group[0], tuple(group[1:])) for group in supernodes if group]


def to_supernodes(clusters: list[Cluster]) -> list[list[str]]:
    return [[c.name, *c.members] for c in clusters]


# ---- reading ----------------------------------------------------------------------------------


class GraphFileError(CLTError):
    """A graph file that cannot be read: unreadable, not JSON, not a graph, or a newer version."""


@dataclass
class GraphDocument:
    """One graph JSON as written by `clt attribute` (metadata, qParams, nodes, links)."""

    path: Path
    data: dict[str, Any]
    nodes_by_id: dict[str, dict[str, Any]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.nodes_by_id = {node["node_id"]: node for node in self.nodes}

    @property
    def metadata(self) -> dict[str, Any]:
        return self.data["metadata"]

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return self.data["nodes"]

    @property
    def links(self) -> list[dict[str, Any]]:
        return self.data["links"]

    @property
    def slug(self) -> str:
        return str(self.metadata.get("slug") or self.path.stem)

    @property
    def prompt_tokens(self) -> list[str]:
        return list(self.metadata["prompt_tokens"])

    @property
    def supernodes(self) -> list[list[str]]:
        return list(self.data.get("qParams", {}).get("supernodes", []))

    @property
    def pinned(self) -> list[str]:
        """`qParams.pinnedIds`: the node ids pinned into the subgraph (Neuronpedia's field)."""
        ids = self.data.get("qParams", {}).get("pinnedIds", [])
        return [str(x) for x in ids] if isinstance(ids, list) else [x for x in str(ids).split(",") if x]

    @property
    def clusters(self) -> list[Cluster]:
        return from_supernodes(self.supernodes)

    @functools.cached_property
    def n_layers(self) -> int:
        """Layers of the model: logit nodes sit at layer n_layers + 1 (circuit-tracer's convention)."""
        logit_layers = [int(n["layer"]) for n in self.nodes if n["feature_type"] == LOGIT]
        if logit_layers:
            return max(logit_layers) - 1
        inner = [int(n["layer"]) for n in self.nodes if n["feature_type"] in (FEATURE, ERROR)]
        return max(inner, default=-1) + 1

    def parse(self, node_id: str) -> NodeId:
        """The parts of `node_id`: by its node's kind when the file holds it, else by the
        model's layers (a node pruned away, or re-pruned in from the raw graph)."""
        node = self.nodes_by_id.get(node_id)
        return parse_node(node) if node is not None else parse_node_id(node_id, self.n_layers)


def read_graph(path: Path, max_bytes: int = MAX_BYTES) -> GraphDocument:
    """Read and check one graph JSON; `GraphFileError` names the file and the problem (a
    version other than SCHEMA_VERSION included)."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise GraphFileError(f"{path}: cannot read the graph file ({err.strerror}).") from None
    if size > max_bytes:
        raise GraphFileError(f"{path}: {size / 1e6:.0f} MB is larger than the {max_bytes / 1e6:.0f} MB a graph may be.")
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise GraphFileError(
            f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}). "
            "A graph file is written by `clt attribute`."
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise GraphFileError(f"{path}: cannot read the graph file ({err}).") from None
    if isinstance(data, dict) and isinstance(data.get("metadata"), dict) and check_version(data["metadata"], path) == 1:
        upgrade_v1(data, SCHEMA_VERSION)
    check_graph(data, path)
    return GraphDocument(path, data)


def check_version(metadata: Mapping[str, Any], path: Path) -> int:
    """The file's `schema_version` (absent: 1); refuses one this module does not read."""
    version = metadata.get("schema_version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise GraphFileError(
            f"{path}: graph schema_version {version} is newer than this clt-forge reads "
            f"(up to {SCHEMA_VERSION}); open it with the clt-forge that wrote it, or upgrade."
        )
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise GraphFileError(
            f"{path}: unknown graph schema_version {version!r} (this clt-forge reads "
            f"{' and '.join(map(str, READABLE_VERSIONS))}); expected a graph JSON from `clt attribute` (docs/formats.md)."
        )
    return int(version)


def check_graph(data: Any, path: Path) -> None:
    """The structure readers rely on; raises on the first problem, naming where it is."""

    def fail(problem: str) -> None:
        raise GraphFileError(f"{path}: {problem}. Expected a graph JSON from `clt attribute` (docs/formats.md).")

    if not isinstance(data, dict):
        fail(f"the top level is a {type(data).__name__}, not an object with metadata, qParams, nodes and links")
    for key, kind in (("metadata", dict), ("nodes", list), ("links", list)):
        if key not in data:
            fail(f"missing key '{key}'")
        if not isinstance(data[key], kind):
            fail(f"'{key}' is a {type(data[key]).__name__}, not a {kind.__name__}")
    tokens = data["metadata"].get("prompt_tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        fail("metadata.prompt_tokens must be a list of strings (the prompt's tokens, BOS first)")
    seen: dict[str, int] = {}
    for i, node in enumerate(data["nodes"]):
        if not isinstance(node, dict):
            fail(f"nodes[{i}] is not an object")
        fields: tuple[tuple[str, type[Any]], ...] = (("node_id", str), ("feature_type", str), ("ctx_idx", int))
        for key, kind in fields:
            if not isinstance(node.get(key), kind) or isinstance(node.get(key), bool):
                fail(f"nodes[{i}].{key} must be a {kind.__name__} (got {node.get(key)!r})")
        if node["feature_type"] not in tuple(NodeKind):
            fail(f"nodes[{i}].feature_type {node['feature_type']!r} is not one of {', '.join(map(repr, NodeKind))}")
        layer = node.get("layer")
        if isinstance(layer, bool) or not isinstance(layer, str | int) or not (layer == "E" or str(layer).isdigit()):
            fail(f"nodes[{i}].layer {layer!r} is neither 'E' nor a layer number")
        if not 0 <= node["ctx_idx"] < max(len(tokens), 1):
            fail(f"nodes[{i}].ctx_idx {node['ctx_idx']} is outside the prompt ({len(tokens)} tokens)")
        try:
            parse_node(node)
        except ValueError as err:
            fail(f"nodes[{i}]: {err}")
        if node["node_id"] in seen:
            fail(f"nodes[{i}].node_id {node['node_id']!r} repeats nodes[{seen[node['node_id']]}]")
        seen[node["node_id"]] = i
    for i, link in enumerate(data["links"]):
        if not isinstance(link, dict):
            fail(f"links[{i}] is not an object")
        for end in ("source", "target"):
            if link.get(end) not in seen:
                fail(f"links[{i}].{end} {link.get(end)!r} is not a node id")
        weight = link.get("weight")
        if not isinstance(weight, int | float) or isinstance(weight, bool) or not math.isfinite(weight):
            fail(f"links[{i}].weight must be a finite number (got {weight!r})")
    supernodes = data.get("qParams", {}).get("supernodes", []) if isinstance(data.get("qParams"), dict) else None
    if supernodes is None or not isinstance(supernodes, list):
        fail("qParams must be an object whose supernodes is a list of [name, node_id, ...] lists")
    for i, group in enumerate(supernodes or []):
        if not isinstance(group, list) or not group or not all(isinstance(x, str) for x in group):
            fail(f"qParams.supernodes[{i}] must be a list of strings: [name, node_id, ...]")


# ---- writing clusters -------------------------------------------------------------------------

_SAVE_LOCK = threading.Lock()


def save_clusters(document: GraphDocument, clusters: list[Cluster]) -> None:
    """Write `clusters` into the graph file's qParams.supernodes (see `save_q_params`)."""
    save_q_params(document, supernodes=to_supernodes(clusters))


def save_q_params(document: GraphDocument, **values: Any) -> None:
    """Write `values` into the graph file's qParams (`supernodes`, `pinnedIds`, ...): temporary
    file + atomic rename.

    Everything else in the file is written back as it was read (`indent=1`; a version-1 file
    read here was upgraded to version 2 in memory and is saved so); a file that fails to write
    leaves the original untouched and the temporary file removed."""
    path = document.path
    with _SAVE_LOCK:
        data = document.data
        previous = data.get("qParams")
        data["qParams"] = dict(previous or {}, **values)
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


# ---- writing a graph --------------------------------------------------------------------------


def prune_graph(graph: Graph, node_threshold: float, edge_threshold: float) -> Any:
    """circuit-tracer's `prune_graph`, imported when first called (readers need no torch);
    a module-level name, so benchmarks/attribute.py can time it."""
    from circuit_tracer.graph import prune_graph as prune

    return prune(graph, node_threshold, edge_threshold)


def graph_json(
    graph: Graph,
    tokenizer: Any,
    *,
    slug: str,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    labels: Mapping[tuple[int, int], str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Prune `graph` and return the JSON-ready dict (see the module docstring)."""
    labels = labels or {}
    node_mask, edge_mask, cumulative_scores = (t.cpu() for t in prune_graph(graph, node_threshold, edge_threshold))
    nodes = _nodes(graph, node_mask, cumulative_scores, labels)
    links, connected = _links(graph, nodes, edge_mask)
    used = [
        node for node in nodes.values() if node["node_id"] in connected or node["feature_type"] in (EMBEDDING, LOGIT)
    ]
    meta: dict[str, Any] = {
        "slug": slug,
        "scan": graph.scan if isinstance(graph.scan, str) else "clt-forge",
        "transcoder_list": [],
        "prompt_tokens": [tokenizer.decode([int(t)]) for t in graph.input_tokens],
        "prompt": graph.input_string,
        "node_threshold": node_threshold,
        "schema_version": SCHEMA_VERSION,
        "pruning_settings": {"node_threshold": node_threshold, "edge_threshold": edge_threshold},
    }
    meta.update(metadata or {})
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": q_params, "nodes": used, "links": links}


def _nodes(
    graph: Graph, node_mask: torch.Tensor, scores: torch.Tensor, labels: Mapping[tuple[int, int], str]
) -> dict[int, dict[str, Any]]:
    """Kept nodes by their index in the adjacency matrix (features | errors | tokens | logits).

    circuit-tracer's `Node` fills the fields; the ids are ours (the same as its, but errors)."""
    from circuit_tracer.frontend.graph_models import Node

    n_features = len(graph.selected_features)
    n_layers = graph.cfg.n_layers
    error_end = n_features + graph.n_pos * n_layers
    token_end = error_end + len(graph.input_tokens)
    nodes: dict[int, dict[str, Any]] = {}
    for index in node_mask.nonzero().flatten().tolist():
        influence = float(scores[index])
        if index < n_features:
            active = int(graph.selected_features[index])
            layer, pos, feature = graph.active_features[active].tolist()
            node = Node.feature_node(
                layer, pos, feature, influence=influence, activation=float(graph.activation_values[active])
            )
            node.node_id = feature_node_id(layer, feature, pos)
            node.clerp = labels.get((layer, feature), "")
        elif index < error_end:
            layer, pos = divmod(index - n_features, graph.n_pos)
            node = Node.error_node(layer, pos, influence=influence)
            node.node_id = error_node_id(layer, pos)
            node.jsNodeId = f"{layer}_-1-{pos}"
        elif index < token_end:
            pos = index - error_end
            token_id = int(graph.input_tokens[pos])
            node = Node.token_node(pos, token_id, influence=influence)
            node.node_id = embedding_node_id(token_id, pos)
        else:
            rank = index - token_end
            token, vocab_idx = graph.logit_targets[rank]
            node = Node.logit_node(
                pos=graph.n_pos - 1,
                vocab_idx=vocab_idx,
                token=token,
                target_logit=rank == 0,
                token_prob=float(graph.logit_probabilities[rank]),
                num_layers=n_layers,
            )
            node.node_id = logit_node_id(n_layers, vocab_idx, graph.n_pos - 1)
            node.influence = influence
        nodes[index] = node.model_dump()
    return nodes


def _links(
    graph: Graph, nodes: dict[int, dict[str, Any]], edge_mask: torch.Tensor
) -> tuple[list[dict[str, Any]], set[str]]:
    targets, sources = edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency_matrix.cpu()[targets, sources].tolist()
    links = []
    connected: set[str] = set()
    for source, target, weight in zip(sources.tolist(), targets.tolist(), weights, strict=True):
        if source in nodes and target in nodes:
            source_id, target_id = nodes[source]["node_id"], nodes[target]["node_id"]
            links.append({"source": source_id, "target": target_id, "weight": weight})
            connected.update((source_id, target_id))
    return links, connected
