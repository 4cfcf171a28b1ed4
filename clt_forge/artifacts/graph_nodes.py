"""Node ids and kinds of the graph JSON (`artifacts/graph.py`): the id of each kind, and its parser.

    feature    {layer}_{feature}_{pos}        embedding  E_{token_id}_{pos}
    error      {layer}_-1_{pos}               logit      {n_layers + 1}_{token_id}_{pos}

These are the ids upstream circuit-tracer writes since it fixed its error-node collision
(0.5.0 wrote "0_L_p", also the id of layer-0 feature L at p); Neuronpedia reads an id by its
three parts. Graph schema version 1 (clt-forge before it) named error nodes "err_L_p": the
parsers still read that form (as an error node; `str()` writes the new one) and `read_graph`
renames such ids on read (`LEGACY_ERROR`). A logit's id looks like a feature's of layer
n_layers + 1: the node's `feature_type` (`parse_node`) or the model's number of layers
(`parse_node_id`) tells them apart. Import these from `clt_forge.artifacts.graph`, the
format's one entry point.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

__all__ = [
    "EMBEDDING",
    "ERROR",
    "FEATURE",
    "LOGIT",
    "NodeId",
    "NodeKind",
    "embedding_node_id",
    "error_node_id",
    "feature_node_id",
    "legacy_error_node_id",
    "logit_node_id",
    "parse_node",
    "parse_node_id",
    "upgrade_v1",
]


class NodeKind(StrEnum):
    """A node's `feature_type`."""

    FEATURE = "cross layer transcoder"
    ERROR = "mlp reconstruction error"
    EMBEDDING = "embedding"
    LOGIT = "logit"


FEATURE, ERROR, EMBEDDING, LOGIT = NodeKind.FEATURE, NodeKind.ERROR, NodeKind.EMBEDDING, NodeKind.LOGIT


def feature_node_id(layer: int, feature: int, pos: int) -> str:
    return f"{layer}_{feature}_{pos}"


def error_node_id(layer: int, pos: int) -> str:
    return f"{layer}_-1_{pos}"


def legacy_error_node_id(layer: int, pos: int) -> str:
    """The error node's id in graph schema version 1 (read, never written)."""
    return f"err_{layer}_{pos}"


def embedding_node_id(token_id: int, pos: int) -> str:
    return f"E_{token_id}_{pos}"


def logit_node_id(n_layers: int, token_id: int, pos: int) -> str:
    return f"{n_layers + 1}_{token_id}_{pos}"


@dataclass(frozen=True)
class NodeId:
    """A node id, parsed; `str()` writes it back.

    kind        layer                          index             pos
    feature     the feature's layer            feature index     token position
    error       the MLP's layer                None              token position
    embedding   None                           token id          token position
    logit       n_layers + 1 (as in `layer`)   token id          token position (the last)
    """

    kind: NodeKind
    layer: int | None
    index: int | None
    pos: int

    def __str__(self) -> str:
        layer, index = cast(int, self.layer), cast(int, self.index)
        if self.kind is ERROR:
            return error_node_id(layer, self.pos)
        if self.kind is EMBEDDING:
            return embedding_node_id(index, self.pos)
        if self.kind is LOGIT:
            return logit_node_id(layer - 1, index, self.pos)
        return feature_node_id(layer, index, self.pos)

    @property
    def layer_pos_feature(self) -> tuple[int, int, int]:
        """(layer, pos, feature) of a CLT feature node: the order interventions take."""
        if self.kind is not FEATURE:
            raise ValueError(f"node {self} is not a CLT feature")
        return cast(int, self.layer), self.pos, cast(int, self.index)


_ID = re.compile(r"(err|E|[0-9]+)_(-1|[0-9]+)_([0-9]+)")


def parse_node_id(node_id: str, n_layers: int) -> NodeId:
    """The parts of `node_id` of a graph of a model with `n_layers` layers, which tells a logit
    (`{n_layers + 1}_...`) from a feature. ValueError when it is no id of such a graph."""
    found = _parse(node_id, None)
    if found.kind is FEATURE and found.layer == n_layers + 1:
        return NodeId(LOGIT, found.layer, found.index, found.pos)
    if found.kind in (FEATURE, ERROR) and not 0 <= cast(int, found.layer) < n_layers:
        raise ValueError(f"node id {node_id!r}: layer {found.layer} of a model with {n_layers} layers")
    return found


def parse_node(node: Mapping[str, Any]) -> NodeId:
    """The parts of the id of `node` (an object of `nodes[]`), read as the kind its
    `feature_type` names. ValueError when the id is not one of that kind."""
    kind = node.get("feature_type")
    if kind not in tuple(NodeKind):
        raise ValueError(f"node {node.get('node_id')!r}: feature_type {kind!r} is no node kind")
    return _parse(str(node.get("node_id")), NodeKind(kind))


def upgrade_v1(data: dict[str, Any], version: int) -> None:
    """Rename a version-1 graph's error ids to "L_-1_p", in place, and mark it `version`.

    An error node's id is renamed when it is "err_L_p" (clt-forge) or "0_L_p" (circuit-tracer
    0.5.0, unless a feature node has that id too, when the links cannot be told apart) for its
    own layer L and position p; links and qParams (supernodes, pinnedIds, clickedId) follow.
    Anything malformed is left for `check_graph` to report."""
    nodes: list[Any] = data["nodes"] if isinstance(data.get("nodes"), list) else []
    links: list[Any] = data["links"] if isinstance(data.get("links"), list) else []
    ids = Counter(n.get("node_id") for n in nodes if isinstance(n, dict) and isinstance(n.get("node_id"), str))
    renamed: dict[str, str] = {}

    def new(x: Any) -> Any:
        return renamed.get(x, x) if isinstance(x, str) else x

    for node in nodes:
        if not isinstance(node, dict) or node.get("feature_type") != ERROR:
            continue
        layer, pos = str(node.get("layer")), node.get("ctx_idx")
        if not layer.isdigit() or not isinstance(pos, int) or isinstance(pos, bool):
            continue
        old = node.get("node_id")
        legacy = legacy_error_node_id(int(layer), pos)
        if old == legacy or (old == feature_node_id(0, int(layer), pos) and ids[old] == 1):
            renamed[old] = node["node_id"] = error_node_id(int(layer), pos)
            node["jsNodeId"] = f"{layer}_-1-{pos}"
    for link in links:
        for end in ("source", "target"):
            if isinstance(link, dict) and end in link:
                link[end] = new(link[end])
    q_params = data.get("qParams")
    if isinstance(q_params, dict):
        for key in ("supernodes", "pinnedIds"):
            value = q_params.get(key)
            if isinstance(value, list):  # supernodes: [name, node_id, ...]; pinnedIds: node ids
                q_params[key] = [[v[0], *map(new, v[1:])] if isinstance(v, list) and v else new(v) for v in value]
        if "clickedId" in q_params:
            q_params["clickedId"] = new(q_params["clickedId"])
    if isinstance(data.get("metadata"), dict):
        data["metadata"]["schema_version"] = version


def _parse(node_id: str, kind: NodeKind | None) -> NodeId:
    match = _ID.fullmatch(node_id)
    head = match[1] if match else ""
    if match is None or (match[2] == "-1" and head in ("err", "E")):  # -1 follows a layer number only
        found = None
    elif match[2] == "-1":
        found = NodeId(ERROR, int(head), None, int(match[3]))
    elif head == "err":  # schema version 1
        found = NodeId(ERROR, int(match[2]), None, int(match[3]))
    elif head == "E":
        found = NodeId(EMBEDDING, None, int(match[2]), int(match[3]))
    else:
        found = NodeId(LOGIT if kind is LOGIT else FEATURE, int(head), int(match[2]), int(match[3]))
    if found is None or (kind is not None and found.kind is not kind):
        shapes = "LAYER_FEATURE_POS, LAYER_-1_POS, E_TOKEN_POS or {n_layers + 1}_TOKEN_POS"
        expected = f"the id of a {kind} node" if kind else f"a node id ({shapes})"
        raise ValueError(f"node id {node_id!r} is not {expected}")
    return found
