"""Where nodes go: Cytoscape elements of the main view at preset positions, on a layer x position grid.

Rows are layers, bottom to top: the prompt's token embeddings, CLT features and MLP error
nodes of each layer, output logits; a layer with no node gets no row (its neighbours' axis
labels say which layers are shown). Columns are token positions, left to right. Every node is
a box of BOX_W x BOX_H (serve/style.py) in a slot of its (position, layer) cell: the slots of
a cell are filled line by line, `per_line[pos]` boxes to a line, so boxes never overlap. A
crowded column first gets as many boxes to a line as its most crowded cell holds; then the
widest column gives one up, and again, until the drawing is no wider than ASPECT times its
height (a 1400x900 window's graph area); a drawing narrower than that gets wider gaps between
positions. Positions are computed here once, so the browser runs no layout algorithm (the
`preset` layout) and re-pruning never moves a node of an unchanged cell.

Axis labels (layers on the left, tokens along the bottom) are sized for the zoom at which the
drawing fits that area, so they read at about 12 px whatever the graph's size.

Edges carry their width and colour (blue: positive weight, red: negative; paler when weaker)
in their data, scaled by |weight| / max |weight| over the edges shown, and are listed weakest
first so the strongest are drawn on top. They are opaque: on a software-rendered canvas,
per-edge opacity doubles the time of a frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from clt_forge.artifacts.graph import EMBEDDING, ERROR, FEATURE, LOGIT, Cluster, parse_node
from clt_forge.serve.style import BOX_H, BOX_W, CLUSTER_COLOURS, NEGATIVE, POSITIVE, STYLESHEET

__all__ = [
    "CLUSTER_COLOURS",
    "STYLESHEET",
    "Grid",
    "box_label",
    "elements",
    "extent",
    "grid",
    "logit_token",
    "node_title",
    "positions",
    "short_token",
]

SLOT_W, SLOT_H = BOX_W + 8, BOX_H + 4  # a box and the gap to its neighbours
COLUMN_PAD = 30  # px between token positions (at least)
ROW_PAD = 5  # px between layers
ASPECT = 1.3  # width / height of the graph area at 1400x900
VIEW_W, VIEW_H = 960, 740  # that area in px: axis labels are sized for it
LABEL_CHARS = 15  # characters of a label that fit in a box at its font size


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
    """The text drawn in a node's box: the explanation (or L#feature), the token, cut to fit."""
    kind = node["feature_type"]
    if kind == FEATURE:
        layer, _, feature = parse_node(node).layer_pos_feature
        text = str(node.get("clerp") or f"L{layer} #{feature}")
    elif kind == ERROR:
        return f"ε{node['layer']}"
    elif kind == EMBEDDING:
        pos = node["ctx_idx"]
        text = short_token(prompt_tokens[pos], LABEL_CHARS) if 0 <= pos < len(prompt_tokens) else "?"
    elif kind == LOGIT:
        text = short_token(logit_token(node), LABEL_CHARS)
    else:
        text = str(node.get("clerp") or "")
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def _row(node: dict[str, Any], n_layers: int) -> int:
    kind = node["feature_type"]
    if kind == EMBEDDING:
        return 0
    if kind == LOGIT:
        return n_layers + 1
    return int(node["layer"]) + 1


@dataclass
class Grid:
    """Where each node's box is (`coords`: node_id -> centre), and the axes: the y of each row
    shown, the x of each position, the drawing's width and height."""

    coords: dict[str, tuple[float, float]] = field(default_factory=dict)
    row_y: dict[int, float] = field(default_factory=dict)
    col_x: list[float] = field(default_factory=list)
    width: float = 0.0
    height: float = 0.0

    @property
    def fit_zoom(self) -> float:
        """The zoom at which the drawing fills the graph area of a 1400x900 window."""
        return min(VIEW_W / max(self.width + 120, 1), VIEW_H / max(self.height + 80, 1))


def _lines(cells: dict[tuple[int, int], list[Any]], per_line: list[int]) -> dict[int, int]:
    """Lines of boxes each row needs: its most crowded cell's."""
    out: dict[int, int] = {}
    for (pos, row), members in cells.items():
        out[row] = max(out.get(row, 1), math.ceil(len(members) / per_line[pos]))
    return out


def _per_line(cells: dict[tuple[int, int], list[Any]], n_cols: int) -> tuple[list[int], dict[int, int]]:
    """Boxes to a line per position: the widest column gives one up until the drawing is no
    wider than ASPECT times its height (see the module docstring)."""
    per_line = [1] * n_cols
    for (pos, _), members in cells.items():
        per_line[pos] = max(per_line[pos], len(members))
    while True:
        lines = _lines(cells, per_line)
        width = sum(n * SLOT_W + COLUMN_PAD for n in per_line)
        height = sum(n * SLOT_H + ROW_PAD for n in lines.values())
        widest = max(range(n_cols), key=lambda c: per_line[c])
        if width <= ASPECT * height or per_line[widest] == 1:
            return per_line, lines
        per_line[widest] -= 1


def grid(nodes: list[dict[str, Any]], n_layers: int, n_pos: int) -> Grid:
    """The boxes of `nodes` on the layer x position grid (Cytoscape's model coordinates, y down)."""
    cells: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for node in nodes:
        cells.setdefault((node["ctx_idx"], _row(node, n_layers)), []).append(node)
    n_cols = max(n_pos, 1 + max((pos for pos, _ in cells), default=0))
    per_line, lines = _per_line(cells, n_cols)
    lines.setdefault(0, 1)
    lines.setdefault(n_layers + 1, 1)
    out = Grid()
    y = 0.0
    for row in sorted(lines, reverse=True):  # logits at the top
        out.row_y[row] = y + (lines[row] * SLOT_H) / 2
        y += lines[row] * SLOT_H + ROW_PAD
    out.height = y
    natural = sum(n * SLOT_W + COLUMN_PAD for n in per_line)
    pad = COLUMN_PAD + max(0.0, ASPECT * out.height - natural) / n_cols
    x = 0.0
    for n in per_line:
        out.col_x.append(x + n * SLOT_W / 2)
        x += n * SLOT_W + pad
    out.width = x
    for (pos, row), members in cells.items():
        members.sort(key=lambda n: (n["feature_type"] == ERROR, -(n.get("activation") or 0.0), n["node_id"]))
        top = out.row_y[row] - (math.ceil(len(members) / per_line[pos]) - 1) * SLOT_H / 2
        for i, node in enumerate(members):
            line, slot = divmod(i, per_line[pos])
            in_line = min(per_line[pos], len(members) - line * per_line[pos])
            left = out.col_x[pos] - (in_line - 1) * SLOT_W / 2
            out.coords[node["node_id"]] = (left + slot * SLOT_W, top + line * SLOT_H)
    return out


def positions(nodes: list[dict[str, Any]], n_layers: int, n_pos: int) -> dict[str, tuple[float, float]]:
    """node_id -> (x, y) in Cytoscape's model coordinates (y grows downwards)."""
    return grid(nodes, n_layers, n_pos).coords


def _axes(n_layers: int, prompt_tokens: list[str], layout: Grid) -> list[dict[str, Any]]:
    """Layer labels left of the rows shown, token labels below the columns, at ~12 px on screen."""
    size = round(min(48.0, max(9.0, 12 / layout.fit_zoom)), 1)
    names = {0: "tokens", n_layers + 1: "logits"} | {layer + 1: f"L{layer}" for layer in range(n_layers)}
    left = -BOX_W / 2 - 8
    out = [
        {
            "data": {"id": f"axis:{row}", "label": names.get(row, str(row)), "fs": size},
            "position": {"x": left, "y": y},
            "classes": "axis",
            "selectable": False,
            "grabbable": False,
        }
        for row, y in layout.row_y.items()
    ]
    bottom = layout.row_y[0] + BOX_H / 2 + 4
    for pos, x in enumerate(layout.col_x[: len(prompt_tokens)]):
        out.append(
            {
                "data": {"id": f"axis:pos{pos}", "label": short_token(prompt_tokens[pos], 12), "fs": size},
                "position": {"x": x, "y": bottom},
                "classes": "axis tokens",
                "selectable": False,
                "grabbable": False,
            }
        )
    return out


def extent(layout: Grid) -> list[float]:
    """[x0, y0, x1, y1] of the drawing with its axis labels: what the page fits to its view."""
    size = min(48.0, max(9.0, 12 / layout.fit_zoom))
    return [-BOX_W / 2 - 8 - 4 * size, -BOX_H, layout.width, layout.height + 2 * size]


def elements(
    nodes: list[dict[str, Any]],
    links: list[dict[str, Any]],
    layout: Grid,
    *,
    n_layers: int,
    prompt_tokens: list[str],
    clusters: list[Cluster],
) -> list[dict[str, Any]]:
    """Cytoscape elements of `nodes` and `links` at the positions of `layout` (cluster nodes:
    their members' mean), with the axes."""
    base = layout.coords
    colour = {c.name: CLUSTER_COLOURS[i % len(CLUSTER_COLOURS)] for i, c in enumerate(clusters)}
    member_of = {m: c.name for c in clusters for m in c.members}
    out = _axes(n_layers, prompt_tokens, layout)
    for node in nodes:
        node_id, kind = node["node_id"], node["feature_type"]
        classes = {FEATURE: "feature", ERROR: "error", EMBEDDING: "embedding", LOGIT: "logit"}.get(kind, "cluster")
        data: dict[str, Any] = {"id": node_id, "tip": node_title(node, prompt_tokens)}
        data["label"] = box_label(node, prompt_tokens)
        if kind == "cluster":
            xs, ys = zip(*(base[m] for m in node["members"]), strict=True)
            x, y = sum(xs) / len(xs), sum(ys) / len(ys)
            data["ccolor"] = colour[node["clerp"]]
        else:
            x, y = base[node_id]
            if node_id in member_of:
                classes += " member"
                data["ccolor"] = colour[member_of[node_id]]
        out.append({"data": data, "position": {"x": x, "y": y}, "classes": classes})
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
