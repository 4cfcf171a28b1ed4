"""A circuit-tracer `Graph` -> the graph JSON people view and share (Neuronpedia schema).

The output has circuit-tracer's `create_graph_files` shape (metadata, qParams, nodes, links;
node fields node_id, feature, layer, ctx_idx, feature_type, jsNodeId, clerp, influence,
activation, ...) and validates against Neuronpedia's graph schema, with these differences:

- unique node ids: circuit-tracer 0.5.0 names the error node of (layer L, position p)
  "0_L_p", which is also the id of layer-0 feature L at position p, so the two nodes' edges
  merge. Error nodes here are "err_L_p" (jsNodeId "err_L-p"); all other ids are unchanged;
- feature labels (`clerp`) come from a mapping (layer, feature) -> explanation, normally
  the `clt autointerp` database;
- no tokenizer download: tokens are decoded with the tokenizer we already hold;
- metadata also records the replacement and completeness scores, the generation and pruning
  settings, and where the raw graph, checkpoint and feature database are, so `clt serve`
  can re-prune and intervene from the JSON alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from circuit_tracer.frontend.graph_models import Node
from circuit_tracer.graph import Graph, prune_graph

__all__ = ["SCHEMA_VERSION", "error_node_id", "graph_json"]

SCHEMA_VERSION = 1


def error_node_id(layer: int, pos: int) -> str:
    return f"err_{layer}_{pos}"


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
        node
        for node in nodes.values()
        if node["node_id"] in connected or node["feature_type"] in ("embedding", "logit")
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
    """Kept nodes by their index in the adjacency matrix (features | errors | tokens | logits)."""
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
            node.clerp = labels.get((layer, feature), "")
        elif index < error_end:
            layer, pos = divmod(index - n_features, graph.n_pos)
            node = Node.error_node(layer, pos, influence=influence)
            node.node_id = error_node_id(layer, pos)
            node.jsNodeId = f"err_{layer}-{pos}"
        elif index < token_end:
            pos = index - error_end
            node = Node.token_node(pos, int(graph.input_tokens[pos]), influence=influence)
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
