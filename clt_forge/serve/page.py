"""The page of `clt serve`: header with the graph picker, the graph and its controls, the
sidebar (node panel, clusters, interventions), the error page. Component ids are what
the callbacks (serve/callbacks/) and assets/serve.js refer to.
"""

from __future__ import annotations

from typing import Any

import dash_cytoscape as cyto
from dash import dcc, html

from clt_forge.artifacts.graph import GraphDocument
from clt_forge.serve.layout import STYLESHEET, short_token
from clt_forge.serve.panel import empty_panel
from clt_forge.serve.state import DEFAULT_MAX_LINKS, DEFAULT_THRESHOLDS, ServeState

__all__ = ["error_page", "header", "page"]

LINK_CHOICES = [500, 1000, 2000, 5000, 20000, 0]  # links drawn; 0: all


def _slider(component_id: str, low: float, value: float) -> dcc.Slider:
    return dcc.Slider(
        id=component_id,
        min=low,
        max=1.0,
        step=0.01,
        value=value,
        marks={low: str(low), 1.0: "1"},
        updatemode="mouseup",
        tooltip={"placement": "bottom", "always_visible": False},
    )


def page(state: ServeState) -> html.Div:
    """The whole page; callbacks fill it in."""
    legend, controls, graph = _legend(), _controls(), _graph()
    clusters, interventions = _clusters(), _interventions()
    return html.Div(
        [
            dcc.Location(id="url", refresh=False),
            dcc.Store(id="graph-key"),
            dcc.Store(id="rendered"),
            dcc.Store(id="graph-meta"),
            dcc.Store(id="cy-ready"),
            dcc.Store(id="clicked"),
            dcc.Store(id="panel-html", data=empty_panel()),
            dcc.Store(id="panel-html-shown"),
            dcc.Store(id="selection", data=[]),
            dcc.Store(id="clusters", data=[]),
            dcc.Store(id="pinned", data=[]),
            dcc.Store(id="pinned-shown"),
            dcc.Store(id="proposals", data=[]),
            dcc.Store(id="jobs", data=[]),
            dcc.Download(id="download"),
            html.Header(
                [
                    html.Span("clt serve", className="brand"),
                    dcc.Dropdown(id="picker", options=state.library.names(), clearable=False, className="picker"),
                    html.Div(id="header-info", className="header-info"),
                ],
                className="header",
            ),
            html.Div(id="error-box", className="error-page", style={"display": "none"}),
            html.Main(
                [
                    html.Section(
                        [
                            controls,
                            html.Div(
                                [graph, html.Div(id="hover-tip", className="hover-tip"), _search()],
                                className="graph-wrap",
                            ),
                            _subgraph(),
                            legend,
                        ],
                        className="graph-column",
                    ),
                    html.Aside(
                        [
                            html.Section(
                                [html.H2("Node"), html.Div(id="panel", className="panel-box")], className="card"
                            ),
                            clusters,
                            interventions,
                        ],
                        className="sidebar",
                    ),
                ],
                id="main",
                className="main",
            ),
        ],
        className="app",
    )


def _legend() -> html.Div:
    """The key to the node and link colours, and the view note."""
    return html.Div(
        [
            html.Span([html.I(className="key embedding"), "token"]),
            html.Span([html.I(className="key feature"), "feature"]),
            html.Span([html.I(className="key error"), "error"]),
            html.Span([html.I(className="key logit"), "logit"]),
            html.Span([html.I(className="key edge-pos"), "+ weight"]),
            html.Span([html.I(className="key edge-neg"), "− weight"]),
            html.Div(id="view-note", className="view-note"),
        ],
        className="legend-bar",
    )


def _controls() -> html.Div:
    """The thresholds, the links drawn and the collapse switch."""
    return html.Div(
        [
            html.Div(
                [html.Label("node threshold"), _slider("node-threshold", 0.3, DEFAULT_THRESHOLDS[0])],
                className="control",
            ),
            html.Div(
                [html.Label("edge threshold"), _slider("edge-threshold", 0.5, DEFAULT_THRESHOLDS[1])],
                className="control",
            ),
            html.Div(
                [
                    html.Label("links drawn"),
                    dcc.Dropdown(
                        id="max-links",
                        options=[{"label": f"{n:,} strongest" if n else "all", "value": n} for n in LINK_CHOICES],
                        value=DEFAULT_MAX_LINKS,
                        clearable=False,
                        searchable=False,
                    ),
                ],
                className="control links",
            ),
            dcc.Checklist(
                id="collapse",
                options=[{"label": " collapse clusters", "value": "on"}],
                value=[],
                className="control-check",
            ),
        ],
        className="controls",
    )


def _search() -> html.Div:
    """The search box over the graph (assets/serve.js searches the nodes drawn)."""
    return html.Div(
        [
            dcc.Input(id="search", type="search", placeholder="search: label, id or token", debounce=False),
            html.Div(id="search-results", className="search-results"),
        ],
        className="search-box",
    )


def _subgraph() -> html.Section:
    """The subgraph: pinned nodes (assets/serve.js draws them as SVG), and the pin buttons."""
    return html.Section(
        [
            html.Div(
                [
                    html.Span("Subgraph", className="sub-title"),
                    html.Button("Pin clicked / selected", id="pin", className="btn small"),
                    html.Button("Unpin clicked", id="unpin", className="btn small secondary"),
                    html.Button("Clear", id="unpin-all", className="btn small secondary"),
                    html.Span(id="pin-status", className="status"),
                ],
                className="sub-bar",
            ),
            html.Div(id="subgraph", className="subgraph"),
        ],
        id="subgraph-card",
        className="subgraph-card",
    )


def _graph() -> cyto.Cytoscape:
    """The Cytoscape canvas (its elements come from assets/serve.js)."""
    return cyto.Cytoscape(
        id="graph",
        elements=[],
        stylesheet=STYLESHEET,
        layout={"name": "preset", "fit": True, "padding": 24, "animate": False},
        style={"width": "100%", "height": "100%"},
        minZoom=0.05,
        maxZoom=8,
        boxSelectionEnabled=True,
        autoungrabify=True,
        autoRefreshLayout=False,
    )


def _clusters() -> html.Section:
    """The clusters card: name, group, list, export."""
    return html.Section(
        [
            html.H2("Clusters"),
            html.Div(
                [
                    dcc.Input(id="cluster-name", placeholder="name, e.g. say a capital", type="text", debounce=False),
                    html.Button("Group selected", id="cluster-create", className="btn"),
                ],
                className="row",
            ),
            html.Div("Shift+click or shift+drag to select nodes.", id="selection-note", className="hint"),
            html.Div(id="cluster-list"),
            html.Div(id="cluster-status", className="status"),
            html.Div(
                [
                    html.Button("Export subgraph", id="export", className="btn secondary"),
                    html.Button("Propose clusters", id="propose", className="btn secondary"),
                ],
                className="row",
            ),
            html.Div(id="proposal-list"),
        ],
        className="card",
    )


def _interventions() -> html.Section:
    """The interventions card: target, scale or set, queue, the job board."""
    return html.Section(
        [
            html.H2("Intervene"),
            dcc.Dropdown(id="target", options=[], placeholder="click a feature or make a cluster", clearable=False),
            html.Div(
                [
                    dcc.RadioItems(
                        id="mode",
                        options=[{"label": " scale by", "value": "scale"}, {"label": " set to", "value": "set"}],
                        value="scale",
                        inline=True,
                        className="mode",
                    ),
                    dcc.Input(id="amount", type="number", value=0, step="any", className="amount"),
                    html.Button("Queue", id="queue", className="btn"),
                ],
                className="row",
            ),
            html.Div(id="queue-status", className="status"),
            html.Div(id="jobs-view"),
            dcc.Store(id="jobs-live"),
            dcc.Store(id="jobs-live-shown"),
            dcc.Interval(id="jobs-poll", interval=500, disabled=True),
        ],
        className="card",
    )


def header(document: GraphDocument) -> list[Any]:
    meta = document.metadata
    tokens = [html.Span(short_token(t), className="prompt-token") for t in document.prompt_tokens]
    scores = []
    for key, label in (("replacement_score", "replacement"), ("completeness_score", "completeness")):
        if isinstance(meta.get(key), int | float):
            scores.append(html.Span(f"{label} {meta[key]:.2f}", className="score"))
    model = [html.Span(str(meta["model"]), className="score")] if meta.get("model") else []
    return [html.Div(tokens, className="prompt"), *model, *scores]


def error_page(message: str) -> list[Any]:
    return [
        html.H2("This graph cannot be shown"),
        html.Pre(message, className="error-message"),
        html.P("The server is still running: pick another graph above, or fix the file and reload the page."),
    ]
