"""The graph view: which graph is shown, at which thresholds, and the routes its drawings come from.

The address `?graph=NAME&links=N` (or the picker) picks a file of the GraphLibrary;
`open_graph` reads it and names the view to draw at its saved thresholds; the sliders, the
links control, the collapse switch and the clusters name another (`redraw`). Views travel as
keys (state.View): the page's script (assets/serve.js) fetches their elements from
`/_clt/initial` and `/_clt/elements`, so large payloads never pass through Dash's renderer.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, quote

from dash import Dash, Input, Output, State, ctx, html, no_update
from dash.exceptions import PreventUpdate

from clt_forge.errors import CLTError
from clt_forge.serve.page import error_page, header
from clt_forge.serve.panel import empty_panel
from clt_forge.serve.state import ServeState, View, graph_meta, links_param, saved_thresholds

__all__ = ["register"]

DRAWING = ("elements", "nodes", "edges", "extent")  # what a route sends of a drawing


def register(app: Dash, state: ServeState) -> None:
    """Open a graph from the address or the picker, redraw on every control, serve drawings."""
    _open_graph(app, state)
    _redraw(app, state)
    _routes(app, state)
    app.clientside_callback(
        "function(meta) { return window.cltServe.onGraph(meta); }",
        Output("cy-ready", "data"),
        Input("graph-meta", "data"),
    )


def _open_graph(app: Dash, state: ServeState) -> None:
    @app.callback(
        Output("url", "search"),
        Output("picker", "value"),
        Output("graph-key", "data"),
        Output("header-info", "children"),
        Output("error-box", "children"),
        Output("error-box", "style"),
        Output("main", "className"),
        Output("node-threshold", "value"),
        Output("edge-threshold", "value"),
        Output("clusters", "data"),
        Output("graph-meta", "data"),
        Output("rendered", "data"),
        Output("view-note", "children"),
        Output("panel-html", "data"),
        Output("clicked", "data"),
        Output("max-links", "value"),
        Input("url", "search"),
        Input("picker", "value"),
        State("collapse", "value"),
        State("max-links", "value"),
    )
    def open_graph(search: str | None, picked: str | None, collapsed: list[str], max_links: int) -> tuple[Any, ...]:
        """The URL (?graph=NAME&links=N) and the picker name the graph shown; either can change it."""
        search_out: Any = no_update
        picker_out: Any = no_update
        if ctx.triggered_id == "picker" and picked:
            name, search_out = picked, f"?graph={quote(picked)}"
        else:
            query = parse_qs((search or "").lstrip("?"))
            name = (query.get("graph") or [state.library.first()])[0]
            picker_out, max_links = name, links_param(query.get("links", [""])[0])
        try:
            document = state.document(name)
            node_t, edge_t = saved_thresholds(document)
            supernodes = document.supernodes
            view = View.of(name, node_t, edge_t, collapsed, supernodes, max_links)
            meta, note = graph_meta(state, view)
        except CLTError as err:
            return (
                search_out,
                picker_out,
                name,
                [html.Span(name, className="score")],
                error_page(str(err)),
                {"display": "block"},
                "main has-error",
                no_update,
                no_update,
                [],
                {"key": None, "error": str(err)},
                None,
                "",
                empty_panel(),
                None,
                max_links,
            )
        return (
            search_out,
            picker_out,
            name,
            header(document),
            [],
            {"display": "none"},
            "main",
            node_t,
            edge_t,
            supernodes,
            meta,
            view.key,
            note,
            empty_panel(),
            None,
            max_links,
        )


def _redraw(app: Dash, state: ServeState) -> None:
    @app.callback(
        Output("graph-meta", "data", allow_duplicate=True),
        Output("rendered", "data", allow_duplicate=True),
        Output("view-note", "children", allow_duplicate=True),
        Input("node-threshold", "value"),
        Input("edge-threshold", "value"),
        Input("collapse", "value"),
        Input("clusters", "data"),
        Input("max-links", "value"),
        State("graph-key", "data"),
        State("rendered", "data"),
        prevent_initial_call=True,
    )
    def redraw(
        node_t: float,
        edge_t: float,
        collapsed: list[str],
        supernodes: list[list[str]],
        max_links: int,
        name: str | None,
        rendered: str | None,
    ) -> tuple[Any, ...]:
        if not name or rendered is None:
            raise PreventUpdate
        view = View.of(name, node_t, edge_t, collapsed, supernodes, max_links)
        if view.key == rendered:
            raise PreventUpdate
        try:
            meta, note = graph_meta(state, view)
        except CLTError as err:
            return no_update, no_update, html.Span(str(err), className="warn")
        return meta, view.key, note


def _routes(app: Dash, state: ServeState) -> None:
    @app.server.route("/_clt/initial")
    def initial_route() -> Any:
        """The elements of a graph as it opens (saved thresholds, clusters expanded), which
        assets/serve.js fetches while the page starts, before Dash asks for them."""
        from flask import Response, request

        name = request.args.get("graph") or state.library.first()
        try:
            document = state.document(name)
            links = links_param(request.args.get("links", ""))
            view = View.of(name, *saved_thresholds(document), False, document.supernodes, links)
            drawing = state.drawing(view)
        except CLTError as err:
            return Response(json.dumps({"error": str(err)}), status=400, mimetype="application/json")
        body = {"key": name, "view": view.key, **{k: drawing[k] for k in DRAWING}}
        return Response(json.dumps(body, separators=(",", ":")), mimetype="application/json")

    @app.server.route("/_clt/elements", methods=["POST"])
    def elements_route() -> Any:
        """The Cytoscape elements of one drawing, fetched by assets/serve.js: a large graph's
        elements never pass through Dash's renderer, which would copy and walk them."""
        from flask import Response, request

        try:
            drawing = state.drawing(View.parse(request.get_data(as_text=True)))
        except (CLTError, ValueError) as err:
            return Response(json.dumps({"error": str(err)}), status=400, mimetype="application/json")
        body = {k: drawing[k] for k in DRAWING}
        return Response(json.dumps(body, separators=(",", ":")), mimetype="application/json")
