"""How the graph looks: the Cytoscape stylesheet of the main view and the colours it shares.

Nodes are boxes (serve/grid.py gives their size and place, in their data: `w`, `h`) with
their label inside: a feature's explanation, a token for embeddings and logits, at a font
size (`fs`) and cut to a length that fit the box (serve/layout.py). Labels are drawn only
where they are legible (`min-zoomed-font-size`, LEGIBLE px): at the fitted zoom of a large
graph the labels of crowded cells are skipped, which also keeps its frames cheap; zooming in
shows them. Each layer's row is a band, every other one shaded. Hovering a node dims
every element but the node, its links and their other ends (classes `dim`, `hl`, `near`;
assets/serve.js sets them).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BOX_H", "BOX_W", "CLUSTER_COLOURS", "LEGIBLE", "NEGATIVE", "POSITIVE", "STYLESHEET"]

BOX_W, BOX_H = 96, 17  # the largest box of a node, in model px (crowded cells get smaller ones)
LEGIBLE = 10.1  # px: smaller labels are not drawn (Cytoscape compares it with the font size times
# the zoom rounded up to a power of two: at the fitted zoom, just under 1, the font size itself)
POSITIVE, NEGATIVE = "#2563eb", "#dc2626"
CLUSTER_COLOURS = ["#7c3aed", "#db2777", "#0891b2", "#65a30d", "#ea580c", "#4f46e5", "#0d9488", "#be123c"]
LABEL = {
    "label": "data(label)",
    "text-valign": "center",
    "text-halign": "center",
    "font-size": "data(fs)",
    "min-zoomed-font-size": LEGIBLE,
    "text-wrap": "none",
}

STYLESHEET: list[dict[str, Any]] = [
    {
        "selector": "node",
        "style": {
            "shape": "round-rectangle",
            "width": "data(w)",
            "height": "data(h)",
            "background-color": "#fde68a",
            "border-width": 1,
            "border-color": "#b45309",
            "color": "#451a03",
            **LABEL,
        },
    },
    {
        "selector": ".error",
        "style": {
            "shape": "rectangle",
            "background-color": "#e2e8f0",
            "border-color": "#64748b",
            "border-style": "dashed",
            "color": "#334155",
        },
    },
    {"selector": ".embedding", "style": {"background-color": "#475569", "border-color": "#1e293b", "color": "#f8fafc"}},
    {"selector": ".logit", "style": {"background-color": "#16a34a", "border-color": "#14532d", "color": "#f0fdf4"}},
    {
        "selector": ".cluster",
        "style": {
            "background-color": "data(ccolor)",
            "border-color": "#1e1b4b",
            "border-width": 2,
            "font-weight": "bold",
            "color": "#ffffff",
        },
    },
    {"selector": ".member", "style": {"border-width": 3, "border-color": "data(ccolor)"}},
    {"selector": ".pinned", "style": {"border-width": 3, "border-color": "#0f766e", "border-style": "double"}},
    {
        "selector": ".axis",
        "style": {
            "width": 1,
            "height": 1,
            "background-opacity": 0,
            "border-width": 0,
            "label": "data(label)",
            "font-size": "data(fs)",
            "min-zoomed-font-size": 0,
            "color": "#475569",
            "text-valign": "center",
            "text-halign": "left",
            "events": "no",
        },
    },
    {
        "selector": ".band",
        "style": {
            "shape": "rectangle",
            "width": "data(w)",
            "height": "data(h)",
            "background-color": "#eef2f7",
            "background-opacity": 1,
            "border-width": 0,
            "label": "",
            "z-compound-depth": "bottom",
        },
    },
    {"selector": ".axis.tokens", "style": {"text-halign": "center", "text-valign": "bottom", "font-weight": "bold"}},
    {
        "selector": "edge",
        "style": {"curve-style": "haystack", "haystack-radius": 0, "width": "data(w)", "line-color": "data(c)"},
    },
    {"selector": "edge.hl", "style": {"line-color": "data(h)", "z-index": 10}},
    {"selector": ".dim", "style": {"opacity": 0.12}},
    {"selector": "node.near", "style": {"border-width": 2, "border-color": "#111827"}},
    {"selector": ".found", "style": {"border-width": 4, "border-color": "#f97316", "border-style": "solid"}},
    {"selector": "node:selected", "style": {"border-width": 3, "border-color": "#111827", "border-style": "solid"}},
    {"selector": "node.clicked", "style": {"border-width": 4, "border-color": "#dc2626", "border-style": "solid"}},
]
