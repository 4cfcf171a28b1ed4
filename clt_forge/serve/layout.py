"""Where nodes go and how they look: Cytoscape elements (preset positions) and the stylesheet.

Rows are layers, bottom to top: the prompt's token embeddings (row 0), CLT features and MLP
error nodes of layer L (row L + 1), output logits (row n_layers + 1). Columns are token
positions, left to right; a column is as wide as its most crowded row, and the nodes of one
(position, layer) cell sit side by side, centred; a drawing narrower than 1.3 times its
height gets wider gaps between positions. Positions are computed here once, so the
browser runs no layout algorithm (the `preset` layout) and re-pruning never moves a node.

Edges carry their width and colour (blue: positive weight, red: negative; paler when weaker)
in their data, scaled by |weight| / max |weight| over the edges shown, and are listed weakest
first so the strongest are drawn on top. They are opaque: on a software-rendered canvas,
per-edge opacity doubles the time of a frame.
"""

from __future__ import annotations

from typing import Any

from clt_forge.artifacts.graph import EMBEDDING, ERROR, FEATURE, LOGIT, Cluster, parse_node

__all__ = ["CLUSTER_COLOURS", "STYLESHEET", "elements", "logit_token", "node_title", "positions", "short_token"]

ROW = 26  # px between layers
GAP = 17  # px between nodes of one cell
COLUMN_PAD = 40  # px between token positions (at least)
ASPECT = 1.3  # width / height the gaps between positions stretch a narrow drawing to
POSITIVE, NEGATIVE = "#2563eb", "#dc2626"
CLUSTER_COLOURS = ["#7c3aed", "#db2777", "#0891b2", "#65a30d", "#ea580c", "#4f46e5", "#0d9488", "#be123c"]


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


def _row(node: dict[str, Any], n_layers: int) -> int:
    kind = node["feature_type"]
    if kind == EMBEDDING:
        return 0
    if kind == LOGIT:
        return n_layers + 1
    return int(node["layer"]) + 1


def positions(nodes: list[dict[str, Any]], n_layers: int, n_pos: int) -> dict[str, tuple[float, float]]:
    """node_id -> (x, y) in Cytoscape's model coordinates (y grows downwards)."""
    cells: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for node in nodes:
        cells.setdefault((node["ctx_idx"], _row(node, n_layers)), []).append(node)
    widths = [1] * max(n_pos, 1 + max((pos for pos, _ in cells), default=0))
    for (pos, _), members in cells.items():
        widths[pos] = max(widths[pos], len(members))
    # widen the gaps between positions until the drawing is about as wide as a screen
    height = (n_layers + 1) * ROW
    natural = sum(w * GAP + COLUMN_PAD for w in widths)
    pad = COLUMN_PAD + max(0.0, ASPECT * height - natural) / len(widths)
    starts, x = [], 0.0
    for width in widths:
        starts.append(x)
        x += width * GAP + pad
    out: dict[str, tuple[float, float]] = {}
    for (pos, row), members in cells.items():
        members.sort(key=lambda n: (n["feature_type"] == ERROR, -(n.get("activation") or 0.0), n["node_id"]))
        left = starts[pos] + (widths[pos] - len(members)) * GAP / 2 + GAP / 2
        for i, node in enumerate(members):
            out[node["node_id"]] = (left + i * GAP, (n_layers + 1 - row) * ROW)
    return out


def _axis(n_layers: int, n_pos: int, coords: dict[str, tuple[float, float]]) -> list[dict[str, Any]]:
    left = min((x for x, _ in coords.values()), default=0.0) - 46
    labels = {0: "tokens", n_layers + 1: "logits"} | {layer + 1: f"L{layer}" for layer in range(n_layers)}
    return [
        {
            "data": {"id": f"axis:{row}", "label": label},
            "position": {"x": left, "y": (n_layers + 1 - row) * ROW},
            "classes": "axis",
            "selectable": False,
            "grabbable": False,
        }
        for row, label in labels.items()
    ]


def elements(
    nodes: list[dict[str, Any]],
    links: list[dict[str, Any]],
    base: dict[str, tuple[float, float]],
    *,
    n_layers: int,
    prompt_tokens: list[str],
    clusters: list[Cluster],
) -> list[dict[str, Any]]:
    """Cytoscape elements of `nodes` and `links` at the positions `base` (cluster nodes: their members' mean)."""
    colour = {c.name: CLUSTER_COLOURS[i % len(CLUSTER_COLOURS)] for i, c in enumerate(clusters)}
    member_of = {m: c.name for c in clusters for m in c.members}
    out = _axis(n_layers, len(prompt_tokens), base)
    for node in nodes:
        node_id, kind = node["node_id"], node["feature_type"]
        classes = {FEATURE: "feature", ERROR: "error", EMBEDDING: "embedding", LOGIT: "logit"}.get(kind, "cluster")
        data: dict[str, Any] = {"id": node_id, "tip": node_title(node, prompt_tokens)}
        if kind == "cluster":
            xs, ys = zip(*(base[m] for m in node["members"]), strict=True)
            x, y = sum(xs) / len(xs), sum(ys) / len(ys)
            data["label"] = node["clerp"]
            data["ccolor"] = colour[node["clerp"]]
        else:
            x, y = base[node_id]
            if kind == EMBEDDING:
                data["label"] = short_token(prompt_tokens[node["ctx_idx"]], 10)
            elif kind == LOGIT:
                data["label"] = short_token(logit_token(node), 10)
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


STYLESHEET: list[dict[str, Any]] = [
    {
        "selector": "node",
        "style": {
            "width": 10,
            "height": 10,
            "background-color": "#f59e0b",
            "border-width": 1,
            "border-color": "#b45309",
            "min-zoomed-font-size": 7,
        },
    },
    {
        "selector": ".error",
        "style": {
            "shape": "rectangle",
            "width": 9,
            "height": 9,
            "background-color": "#e2e8f0",
            "border-color": "#64748b",
            "border-style": "dashed",
        },
    },
    {
        "selector": ".embedding",
        "style": {
            "shape": "round-rectangle",
            "width": 16,
            "height": 10,
            "background-color": "#475569",
            "border-color": "#1e293b",
            "label": "data(label)",
            "text-valign": "bottom",
            "text-margin-y": 4,
            "font-size": 10,
            "color": "#1e293b",
        },
    },
    {
        "selector": ".logit",
        "style": {
            "shape": "round-rectangle",
            "width": 12,
            "height": 12,
            "background-color": "#16a34a",
            "border-color": "#14532d",
            "label": "data(label)",
            "text-valign": "top",
            "text-halign": "right",
            "text-rotation": "-0.6rad",
            "text-margin-y": -2,
            "font-size": 10,
            "color": "#14532d",
        },
    },
    {
        "selector": ".cluster",
        "style": {
            "shape": "round-rectangle",
            "width": 22,
            "height": 16,
            "background-color": "data(ccolor)",
            "border-color": "#1e1b4b",
            "label": "data(label)",
            "text-valign": "center",
            "text-halign": "right",
            "text-margin-x": 4,
            "font-size": 11,
            "font-weight": "bold",
            "color": "data(ccolor)",
        },
    },
    {"selector": ".member", "style": {"border-width": 3, "border-color": "data(ccolor)"}},
    {
        "selector": ".axis",
        "style": {
            "width": 1,
            "height": 1,
            "background-opacity": 0,
            "border-width": 0,
            "label": "data(label)",
            "font-size": 9,
            "color": "#94a3b8",
            "text-valign": "center",
            "text-halign": "left",
            "events": "no",
        },
    },
    {
        "selector": "edge",
        "style": {
            "curve-style": "haystack",
            "haystack-radius": 0,
            "width": "data(w)",
            "line-color": "data(c)",
        },
    },
    {"selector": "edge.hl", "style": {"line-color": "data(h)", "z-index": 10}},
    {"selector": "node:selected", "style": {"border-width": 3, "border-color": "#111827", "border-style": "solid"}},
    {"selector": "node.clicked", "style": {"border-width": 4, "border-color": "#dc2626", "border-style": "solid"}},
]
