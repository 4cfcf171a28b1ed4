"""The subgraph: pinning and unpinning nodes, saving the pins, and the route its drawing comes from.

The `pinned` store holds the pinned node ids. It is loaded from the graph file's
`qParams.pinnedIds` when a graph opens, changed by the pin buttons (the clicked node, or the
selection; a collapsed cluster pins its members) and by the search results (assets/serve.js),
and written back to the file whenever it differs from it (artifacts.graph.save_q_params).
The page's script draws the subgraph from `/_clt/subgraph` (serve/subgraph.py).
"""

from __future__ import annotations

import json
from typing import Any

from dash import Dash, Input, Output, State, ctx, html
from dash.exceptions import PreventUpdate

from clt_forge.artifacts.graph import from_supernodes, save_q_params
from clt_forge.errors import CLTError
from clt_forge.serve.state import ServeState, View
from clt_forge.serve.subgraph import subgraph_drawing

__all__ = ["register"]


def register(app: Dash, state: ServeState) -> None:
    """Pins loaded, edited and saved; the subgraph drawn by the page's script."""

    @app.callback(
        Output("pinned", "data", allow_duplicate=True),
        Input("graph-key", "data"),
        prevent_initial_call=True,
    )
    def load_pins(name: str | None) -> list[str]:
        try:
            return state.document(name).pinned if name else []
        except CLTError:
            return []

    @app.callback(
        Output("pinned", "data", allow_duplicate=True),
        Input("pin", "n_clicks"),
        Input("unpin", "n_clicks"),
        Input("unpin-all", "n_clicks"),
        State("clicked", "data"),
        State("selection", "data"),
        State("pinned", "data"),
        State("clusters", "data"),
        prevent_initial_call=True,
    )
    def edit_pins(
        _pin: int | None,
        _unpin: int | None,
        _clear: int | None,
        clicked: str | None,
        selection: list[str] | None,
        pinned: list[str] | None,
        supernodes: list[list[str]] | None,
    ) -> list[str]:
        now = list(pinned or [])
        named = {f"cluster:{c.name}": list(c.members) for c in from_supernodes(supernodes or [])}
        if ctx.triggered_id == "unpin-all":
            return []
        chosen = list(selection or []) or ([clicked] if clicked else [])
        ids = [m for i in chosen for m in named.get(i, [i])]
        if not ids:
            raise PreventUpdate
        if ctx.triggered_id == "pin":
            return now + [i for i in dict.fromkeys(ids) if i not in now]
        return [i for i in now if i not in set(ids)]

    @app.callback(
        Output("pin-status", "children"),
        Input("pinned", "data"),
        State("graph-key", "data"),
        prevent_initial_call=True,
    )
    def save_pins(pinned: list[str] | None, name: str | None) -> Any:
        if not name:
            raise PreventUpdate
        try:
            document = state.document(name)
            if list(pinned or []) == document.pinned:
                return f"{len(document.pinned)} pinned"
            save_q_params(document, pinnedIds=list(pinned or []))
            state.library.saved(name, document)
        except (CLTError, OSError) as err:
            return html.Span(f"not saved: {err}", className="warn")
        return f"{len(pinned or [])} pinned; saved to {document.path.name}"

    app.clientside_callback(
        "function(ids) { return window.cltServe.onPinned(ids); }",
        Output("pinned-shown", "data"),
        Input("pinned", "data"),
    )

    @app.server.route("/_clt/subgraph", methods=["POST"])
    def subgraph_route() -> Any:
        """The subgraph of the pinned ids in the view shown (boxes, links, viewBox) as JSON."""
        from flask import Response, request

        try:
            asked = json.loads(request.get_data(as_text=True))
            view = View.parse(str(asked["view"]))
            document = state.document(view.name)
            pruned = state.view(view.name, view.node_threshold, view.edge_threshold)
            pinned = [str(i) for i in asked.get("pinned") or []]
            body = subgraph_drawing(pruned, pinned, view.clusters, document.n_layers, document.prompt_tokens)
        except (CLTError, ValueError, TypeError, KeyError) as err:
            return Response(json.dumps({"error": str(err)}), status=400, mimetype="application/json")
        return Response(json.dumps(body, separators=(",", ":")), mimetype="application/json")
