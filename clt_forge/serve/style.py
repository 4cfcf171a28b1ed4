"""How the graph looks: the Cytoscape stylesheet of the main view and the colours it shares.

Nodes are boxes (serve/layout.py gives their size and place) with their label inside: a
feature's explanation, cut to fit, a token for embeddings and logits. Labels are drawn only
where they are legible (`min-zoomed-font-size`): at the fitted zoom of a large graph they
are skipped, which also keeps its frames cheap; zooming in shows them. Hovering a node dims
every element but the node, its links and their other ends (classes `dim`, `hl`, `near`;
assets/serve.js sets them).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BOX_H", "BOX_W", "CLUSTER_COLOURS", "NEGATIVE", "POSITIVE", "STYLESHEET"]

BOX_W, BOX_H = 78, 20  # a node's box in model px (errors are narrower)
POSITIVE, NEGATIVE = "#2563eb", "#dc2626"
CLUSTER_COLOURS = ["#7c3aed", "#db2777", "#0891b2", "#65a30d", "#ea580c", "#4f46e5", "#0d9488", "#be123c"]
LABEL = {
    "label": "data(label)",
    "text-valign": "center",
    "text-halign": "center",
    "font-size": 11,
    "min-zoomed-font-size": 5,
    "text-wrap": "none",
}

STYLESHEET: list[dict[str, Any]] = [
    {
        "selector": "node",
        "style": {
            "shape": "round-rectangle",
            "width": BOX_W,
            "height": BOX_H,
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
            "width": BOX_H,
            "background-color": "#e2e8f0",
            "border-color": "#64748b",
            "border-style": "dashed",
            "color": "#334155",
            "font-size": 7,
        },
    },
    {"selector": ".embedding", "style": {"background-color": "#475569", "border-color": "#1e293b", "color": "#f8fafc"}},
    {"selector": ".logit", "style": {"background-color": "#16a34a", "border-color": "#14532d", "color": "#f0fdf4"}},
    {
        "selector": ".cluster",
        "style": {
            "height": BOX_H + 6,
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
