"""The main view's Cytoscape elements: node boxes at preset positions, links, axes and bands.

Where each box goes and how big it is comes from serve/grid.py (a layer x position grid sized
for a 1400x900 window, fitted at a zoom of about 1); positions are computed here, so the
browser runs no layout algorithm (the `preset` layout). Re-pruning lays the grid out again
for the nodes kept (the page updates the boxes in place, and the drawing keeps its size). Each node's data carries its box (`w`, `h`), its label's font size (`fs`)
and its label, cut to the characters that fit the box at that size. A collapsed cluster takes
the box of its member nearest the members' centre.

Axis labels (layers on the left, tokens along the bottom) are sized for the zoom at which the
drawing fits that area, so they read at about 12 px whatever the graph's size; every other
layer's band is shaded.

Edges carry their width and colour (blue: positive weight, red: negative; paler when weaker)
in their data, scaled by |weight| / max |weight| over the edges shown, and are listed weakest
first so the strongest are drawn on top. They are opaque: on a software-rendered canvas,
per-edge opacity doubles the time of a frame.
"""

from __future__ import annotations

from typing import Any

from clt_forge.artifacts.graph import EMBEDDING, ERROR, FEATURE, LOGIT, Cluster, parse_node
from clt_forge.serve.grid import CHAR_W, MIN_CHARS, Box, Grid, font_size, grid
from clt_forge.serve.style import CLUSTER_COLOURS, NEGATIVE, POSITIVE, STYLESHEET

__all__ = [
    "CLUSTER_COLOURS",
    "STYLESHEET",
    "Grid",
    "box_label",
    "elements",
    "extent",
    "fit_zoom",
    "fitted_label",
    "grid",
    "logit_token",
    "node_title",
    "positions",
    "short_token",
]

VIEW_W, VIEW_H = 912, 648  # the graph area of a 1400x900 window, less the page's fit padding
AXIS_LEFT, AXIS_TOP, AXIS_BOTTOM = 60.0, 8.0, 30.0  # room for the axis labels around the grid


def short_token(token: str, limit: int = 14) -> str:
    """A token as shown on screen: visible whitespace, cut to `limit` characters."""
    shown = token.replace("\n", "↵").replace("\t", "⇥")
    if not shown.strip():
        shown = shown.replace(" ", "␣") or "∅"
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def node_title(node: dict[str, Any], prompt_tokens: list[str]) -> str:
    """A one-line name for a node (hover text, panel lists)."""
    kind = node["feature_type"]
    if kind == "cluster":
        return f"Cluster “{node.get('clerp', '')}” ({len(node.get('members', []))} nodes)"
    pos = node["ctx_idx"]
    token = short_token(prompt_tokens[pos]) if 0 <= pos < len(prompt_tokens) else "?"
    if kind == FEATURE:
        layer, _, feature = parse_node(node).layer_pos_feature
        name = f"L{layer} #{feature} @ “{token}”"
        return f"{name}: {node['clerp']}" if node.get("clerp") else name
    if kind == ERROR:
        return f"MLP error L{node['layer']} @ “{token}”"
    if kind == EMBEDDING:
        return f"Embedding “{token}” (position {pos})"
    return node.get("clerp") or f"Output (layer {node['layer']})"


def _fade(colour: str, strength: float) -> str:
    """`colour` mixed with white: opaque edges draw about twice as fast as translucent ones."""
    rgb = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(255 - (255 - c) * strength):02x}" for c in rgb)


def logit_token(node: dict[str, Any]) -> str:
    """The token of a logit node, from its label `Output "TOKEN" (p=...)`."""
    clerp = str(node.get("clerp") or "")
    first, last = clerp.find('"'), clerp.rfind('"')
    return clerp[first + 1 : last] if 0 <= first < last else clerp


def box_label(node: dict[str, Any], prompt_tokens: list[str]) -> str:
    """The text drawn in a node's box: the explanation (or L#feature), the token (uncut)."""
    kind = node["feature_type"]
    if kind == FEATURE:
        layer, _, feature = parse_node(node).layer_pos_feature
        text = str(node.get("clerp") or f"L{layer} #{feature}")
    elif kind == ERROR:
        return f"ε{node['layer']}"
    elif kind == EMBEDDING:
        pos = node["ctx_idx"]
        text = short_token(prompt_tokens[pos], 40) if 0 <= pos < len(prompt_tokens) else "?"
    elif kind == LOGIT:
        text = short_token(logit_token(node), 40)
    else:
        text = str(node.get("clerp") or "")
    return text


def fitted_label(text: str, box: Box) -> tuple[str, float]:
    """`text` cut to what fits `box` and its font size: at least MIN_CHARS characters (or all of
    a shorter text) at the largest size that fits, at most 11 px."""
    size = font_size(box.w, box.h, max(1, min(len(text), MIN_CHARS)))
    fits = max(1, int((box.w - 4) / (CHAR_W * size) + 1e-6))
    return (text if len(text) <= fits else text[: fits - 1] + "…"), round(size, 2)


def positions(nodes: list[dict[str, Any]], n_layers: int, n_pos: int) -> dict[str, tuple[float, float]]:
    """node_id -> (x, y) in Cytoscape's model coordinates (y grows downwards)."""
    return grid(nodes, n_layers, n_pos).coords


def extent(layout: Grid) -> list[float]:
    """[x0, y0, x1, y1] of the drawing with its axis labels: what the page fits to its view."""
    return [-AXIS_LEFT, -AXIS_TOP, layout.width, layout.height + AXIS_BOTTOM]


def fit_zoom(layout: Grid) -> float:
    """The zoom at which the drawing fills the graph area of a 1400x900 window (about 1)."""
    x0, y0, x1, y1 = extent(layout)
    return min(VIEW_W / (x1 - x0), VIEW_H / (y1 - y0))


def _axes(n_layers: int, prompt_tokens: list[str], layout: Grid) -> list[dict[str, Any]]:
    """Layer labels left of the rows shown, token labels below the columns, at ~12 px on screen;
    a shaded band behind every other row."""
    size = round(min(48.0, max(9.0, 12 / fit_zoom(layout))), 1)
    names = {0: "tokens", n_layers + 1: "logits"} | {layer + 1: f"L{layer}" for layer in range(n_layers)}
    fixed = {"selectable": False, "grabbable": False}
    out = []
    for i, (row, (top, bottom)) in enumerate(sorted(layout.bands.items(), reverse=True)):
        middle = (top + bottom) / 2
        fs = round(min(size, 0.95 * (bottom - top)), 1)  # a narrow band's label: no taller than it
        label = {"id": f"axis:{row}", "label": names.get(row, str(row)), "fs": fs, "y0": top, "y1": bottom}
        out.append({"data": label, "position": {"x": -6.0, "y": middle}, "classes": "axis", **fixed})
        if i % 2:
            band = {"id": f"band:{row}", "w": layout.width, "h": bottom - top, "fs": 1, "label": ""}
            out.append(
                {"data": band, "position": {"x": layout.width / 2, "y": middle}, "classes": "axis band", **fixed}
            )
    bottom = min(layout.bands[0][1], sum(layout.bands[0]) / 2 + 12)  # below the embeddings' boxes
    for pos, x in enumerate(layout.col_x[: len(prompt_tokens)]):
        token = {"id": f"axis:pos{pos}", "label": short_token(prompt_tokens[pos], 12), "fs": size}
        out.append({"data": token, "position": {"x": x, "y": bottom}, "classes": "axis tokens", **fixed})
    return out


def _cluster_box(members: list[str], boxes: dict[str, Box]) -> Box:
    """A collapsed cluster's box: its member's nearest the members' centre (the others' stay empty)."""
    x = sum(boxes[m].x for m in members) / len(members)
    y = sum(boxes[m].y for m in members) / len(members)
    return min((boxes[m] for m in members), key=lambda b: ((b.x - x) ** 2 + (b.y - y) ** 2, b.y, b.x))


def _distance(a: Box, b: Box) -> float:
    return abs(a.x - b.x) + abs(a.y - b.y)


def elements(
    nodes: list[dict[str, Any]],
    links: list[dict[str, Any]],
    layout: Grid,
    *,
    n_layers: int,
    prompt_tokens: list[str],
    clusters: list[Cluster],
) -> list[dict[str, Any]]:
    """Cytoscape elements of `nodes` and `links` in the boxes of `layout` (cluster nodes: their
    central member's), with the axes."""
    colour = {c.name: CLUSTER_COLOURS[i % len(CLUSTER_COLOURS)] for i, c in enumerate(clusters)}
    member_of = {m: c.name for c in clusters for m in c.members}
    out = _axes(n_layers, prompt_tokens, layout)
    for node in nodes:
        node_id, kind = node["node_id"], node["feature_type"]
        classes = {FEATURE: "feature", ERROR: "error", EMBEDDING: "embedding", LOGIT: "logit"}.get(kind, "cluster")
        data: dict[str, Any] = {"id": node_id, "tip": node_title(node, prompt_tokens)}
        if kind == "cluster":
            box = _cluster_box(node["members"], layout.boxes)
            data["row"] = layout.rows[min(node["members"], key=lambda m: _distance(layout.boxes[m], box))]
            data["ccolor"] = colour[node["clerp"]]
        else:
            box = layout.boxes[node_id]
            data["row"] = layout.rows[node_id]
            if node_id in member_of:
                classes += " member"
                data["ccolor"] = colour[member_of[node_id]]
        data["label"], data["fs"] = fitted_label(box_label(node, prompt_tokens), box)
        data["w"], data["h"] = box.w, box.h
        out.append({"data": data, "position": {"x": box.x, "y": box.y}, "classes": classes})
    top = max((abs(link["weight"]) for link in links), default=1.0) or 1.0
    for link in sorted(links, key=lambda link: abs(link["weight"])):  # strongest drawn last, on top
        strength = (abs(link["weight"]) / top) ** 0.5
        sign = POSITIVE if link["weight"] >= 0 else NEGATIVE
        out.append(
            {
                "data": {
                    "id": f"{link['source']}>{link['target']}",  # stable: an edge's ends never change
                    "source": link["source"],
                    "target": link["target"],
                    "weight": link["weight"],
                    "w": round(0.4 + 3.6 * strength, 2),
                    "c": _fade(sign, 0.2 + 0.8 * strength),
                    "h": sign,
                }
            }
        )
    return out
