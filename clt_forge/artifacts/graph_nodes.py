"""Node ids and kinds of the graph JSON (`artifacts/graph.py`): the id of each kind, and its parser.

    feature    {layer}_{feature}_{pos}        embedding  E_{token_id}_{pos}
    error      err_{layer}_{pos}              logit      {n_layers + 1}_{token_id}_{pos}

These are circuit-tracer's ids but for errors (its "0_L_p" is also the id of layer-0 feature
L at p). A logit's id looks like a feature's of layer n_layers + 1: the node's
`feature_type` (`parse_node`) or the model's number of layers (`parse_node_id`) tells them
apart. Import these from `clt_forge.artifacts.graph`, the format's one entry point.
"""

from __future__ import annotations

import re
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
    "logit_node_id",
    "parse_node",
    "parse_node_id",
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


_ID = re.compile(r"(err|E|[0-9]+)_([0-9]+)_([0-9]+)")


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


def _parse(node_id: str, kind: NodeKind | None) -> NodeId:
    match = _ID.fullmatch(node_id)
    head = match[1] if match else ""
    if match is None:
        found = None
    elif head == "err":
        found = NodeId(ERROR, int(match[2]), None, int(match[3]))
    elif head == "E":
        found = NodeId(EMBEDDING, None, int(match[2]), int(match[3]))
    else:
        found = NodeId(LOGIT if kind is LOGIT else FEATURE, int(head), int(match[2]), int(match[3]))
    if found is None or (kind is not None and found.kind is not kind):
        shapes = "LAYER_FEATURE_POS, err_LAYER_POS, E_TOKEN_POS or {n_layers + 1}_TOKEN_POS"
        expected = f"the id of a {kind} node" if kind else f"a node id ({shapes})"
        raise ValueError(f"node id {node_id!r} is not {expected}")
    return found
