"""The subgraph view: the pinned nodes, laid out by layer and position, with only the links among them.

Pinned ids are the graph file's `qParams.pinnedIds` (Neuronpedia's field). Pinned members of
a cluster (`qParams.supernodes`) are drawn as one node, and the links into and out of it carry
the summed weights of the links they replace (serve/clusters.py `collapse`). Rows are layers
(embeddings at the bottom, logits at the top; a cluster sits in its members' mean row, a row
of its own when that falls between layers), boxes in a row are ordered by token position and
never overlap: a row is lines of at most PER_LINE boxes, GAP_X apart, and rows are LINE_H
apart, so no box, a cluster's included, shares another's place. Labels are cut to CHARS, which
fit a box at the page's font; the page's script (assets/serve.js) draws the result as SVG
and shortens any label that is still wider than its box.
"""

from __future__ import annotations

from typing import Any

from clt_forge.artifacts.graph import EMBEDDING, ERROR, LOGIT, Cluster
from clt_forge.serve.clusters import collapse
from clt_forge.serve.layout import logit_token, node_title, short_token
from clt_forge.serve.pruning import GraphView
from clt_forge.serve.style import CLUSTER_COLOURS, NEGATIVE, POSITIVE

__all__ = ["SUB_H", "SUB_W", "subgraph_drawing"]

SUB_W, SUB_H = 150, 26  # a box of the subgraph view
GAP_X, LINE_H, ROW_GAP = 18, 44, 26  # between boxes of a line; line to line; extra between rows
PER_LINE = 8  # boxes to a line; a fuller row wraps
CHARS = 20  # characters that fit a box at the page's 12 px
FILL = {
    "cross layer transcoder": ("#fde68a", "#b45309", "#451a03"),
    ERROR: ("#e2e8f0", "#64748b", "#334155"),
    EMBEDDING: ("#475569", "#1e293b", "#f8fafc"),
    LOGIT: ("#16a34a", "#14532d", "#f0fdf4"),
}


def _label(node: dict[str, Any], prompt_tokens: list[str]) -> str:
    kind = node["feature_type"]
    if kind == EMBEDDING:
        text = short_token(prompt_tokens[node["ctx_idx"]], CHARS) if node["ctx_idx"] < len(prompt_tokens) else "?"
    elif kind == LOGIT:
        text = "→ " + short_token(logit_token(node), CHARS)
    elif kind == ERROR:
        text = f"error L{node['layer']} @{node['ctx_idx']}"
    else:
        text = str(node.get("clerp") or node_title(node, prompt_tokens).split(":")[0])
    return text if len(text) <= CHARS else text[: CHARS - 1] + "…"


def _row(node: dict[str, Any], n_layers: int) -> float:
    kind = node["feature_type"]
    return 0 if kind == EMBEDDING else n_layers + 1 if kind == LOGIT else int(node["layer"]) + 1


def _box(node: dict[str, Any], x: float, y: float, colour: dict[str, str], prompt_tokens: list[str]) -> dict[str, Any]:
    kind = node["feature_type"]
    if kind == "cluster":
        fill, stroke, ink = colour.get(node["clerp"], CLUSTER_COLOURS[0]), "#1e1b4b", "#ffffff"
        size = f" ({len(node['members'])})"
        name = str(node["clerp"])
        cut = CHARS - len(size)
        label = (name if len(name) <= cut else name[: cut - 1] + "…") + size
    else:
        fill, stroke, ink = FILL[kind]
        label = _label(node, prompt_tokens)
    return {
        "id": node["node_id"],
        "kind": "cluster" if kind == "cluster" else kind.split()[0],
        "label": label,
        "tip": node_title(node, prompt_tokens),
        "x": x,
        "y": y,
        "w": SUB_W,
        "h": SUB_H,
        "fill": fill,
        "stroke": stroke,
        "ink": ink,
    }


def subgraph_drawing(
    view: GraphView, pinned: list[str], clusters: list[Cluster], n_layers: int, prompt_tokens: list[str]
) -> dict[str, Any]:
    """Boxes (id, label, tip, x, y, w, h, kind, colours) and links (weight, width, colour) of
    the pinned nodes shown at the current thresholds, and the SVG viewBox around them."""
    keep = [i for i in dict.fromkeys(pinned) if i in view.by_id]
    inside = GraphView([view.by_id[i] for i in keep], [], exact=view.exact)
    wanted = set(keep)
    inside.links = [link for link in view.links if link["source"] in wanted and link["target"] in wanted]
    members = [Cluster(c.name, tuple(m for m in c.members if m in wanted)) for c in clusters]
    nodes, links = collapse(inside, [c for c in members if c.members])
    colour = {c.name: CLUSTER_COLOURS[i % len(CLUSTER_COLOURS)] for i, c in enumerate(clusters)}
    rows: dict[float, list[tuple[float, dict[str, Any]]]] = {}
    for node in nodes:
        if node["feature_type"] == "cluster":
            parts = [view.by_id[m] for m in node["members"]]
            row = round(sum(_row(p, n_layers) for p in parts) / len(parts), 1)
            rows.setdefault(row, []).append((sum(p["ctx_idx"] for p in parts) / len(parts), node))
        else:
            rows.setdefault(_row(node, n_layers), []).append((node["ctx_idx"], node))
    boxes = []
    y = 0.0
    for row in sorted(rows, reverse=True):
        ordered = sorted(rows[row], key=lambda item: (item[0], item[1]["node_id"]))
        for index, (_, node) in enumerate(ordered):
            line, slot = divmod(index, PER_LINE)
            boxes.append(
                _box(node, slot * (SUB_W + GAP_X) + SUB_W / 2, y + line * LINE_H + SUB_H / 2, colour, prompt_tokens)
            )
        y += ((len(ordered) - 1) // PER_LINE + 1) * LINE_H + ROW_GAP
    width = max((b["x"] + SUB_W / 2 for b in boxes), default=SUB_W)
    height = max((b["y"] + SUB_H / 2 for b in boxes), default=SUB_H)
    top = max((abs(link["weight"]) for link in links), default=1.0) or 1.0
    drawn = []
    for link in sorted(links, key=lambda link: abs(link["weight"])):  # strongest drawn last, on top
        strength = (abs(link["weight"]) / top) ** 0.5
        drawn.append(
            {
                "source": link["source"],
                "target": link["target"],
                "weight": link["weight"],
                "w": round(0.6 + 4.4 * strength, 2),
                "c": POSITIVE if link["weight"] >= 0 else NEGATIVE,
                "o": round(0.25 + 0.75 * strength, 2),
            }
        )
    return {"nodes": boxes, "links": drawn, "viewBox": [-10, -10, width + 20, height + 20]}
