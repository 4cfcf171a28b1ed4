"""Proposed clusters: asking for proposals, and accepting (name edited or not) or rejecting each.

The method is serve/proposals.py. Proposals live in the `proposals` store until answered; an
accepted one becomes a cluster (serve/clusters.py `add_cluster`) saved into the graph file at
once, as a cluster made by hand is.
"""

from __future__ import annotations

from typing import Any

from dash import ALL, Dash, Input, Output, State, ctx, dcc, html
from dash.exceptions import PreventUpdate

from clt_forge.artifacts.graph import from_supernodes, save_clusters, to_supernodes
from clt_forge.errors import CLTError
from clt_forge.serve.clusters import add_cluster
from clt_forge.serve.proposals import propose
from clt_forge.serve.state import ServeState

__all__ = ["register"]


def register(app: Dash, state: ServeState) -> None:
    """The propose button, the proposal list, and accept / reject."""

    @app.callback(
        Output("proposals", "data"),
        Output("cluster-status", "children", allow_duplicate=True),
        Input("propose", "n_clicks"),
        State("graph-key", "data"),
        State("node-threshold", "value"),
        State("edge-threshold", "value"),
        State("pinned", "data"),
        State("clusters", "data"),
        prevent_initial_call=True,
    )
    def ask(_clicks: int, name: str | None, node_t: float, edge_t: float, pinned: Any, supernodes: Any) -> Any:
        if not name:
            raise PreventUpdate
        view = state.view(name, node_t, edge_t)
        found = propose(view, list(pinned or []), from_supernodes(supernodes or []))
        note = f"{len(found)} proposed" if found else "No group of features acts as one here."
        return [p.as_dict() for p in found], note

    @app.callback(
        Output("proposal-list", "children"),
        Input("proposals", "data"),
    )
    def listing(proposals: list[dict[str, Any]] | None) -> Any:
        if not proposals:
            return []
        rows = [
            html.Li(
                [
                    html.Div(
                        [
                            _name_input(i, p["name"]),
                            html.Button("Accept", id={"type": "proposal-accept", "index": i}, className="btn small"),
                            html.Button(
                                "Reject", id={"type": "proposal-reject", "index": i}, className="btn small secondary"
                            ),
                        ],
                        className="row",
                    ),
                    html.Div(
                        f"{len(p['members'])} features, effects alike ≥ {p['similarity']:.2f}: "
                        + ", ".join(p["members"]),
                        className="muted",
                    ),
                ],
                **_data(proposal=str(i)),
            )
            for i, p in enumerate(proposals)
        ]
        return [html.H4("Proposed clusters"), html.Ul(rows, className="cluster-list proposals")]

    @app.callback(
        Output("proposals", "data", allow_duplicate=True),
        Output("clusters", "data", allow_duplicate=True),
        Output("cluster-status", "children", allow_duplicate=True),
        Input({"type": "proposal-accept", "index": ALL}, "n_clicks"),
        Input({"type": "proposal-reject", "index": ALL}, "n_clicks"),
        State({"type": "proposal-name", "index": ALL}, "value"),
        State("proposals", "data"),
        State("clusters", "data"),
        State("graph-key", "data"),
        prevent_initial_call=True,
    )
    def answer(
        accepts: list[Any], rejects: list[Any], names: list[Any], proposals: Any, supernodes: Any, name: Any
    ) -> tuple[Any, Any, Any]:
        trigger = ctx.triggered_id
        if not name or not isinstance(trigger, dict) or not any((accepts or []) + (rejects or [])):
            raise PreventUpdate
        index = int(trigger["index"])
        proposals = list(proposals or [])
        if index >= len(proposals):
            raise PreventUpdate
        chosen = proposals.pop(index)
        if trigger["type"] == "proposal-reject":
            return proposals, supernodes, f"rejected “{chosen['name']}”"
        title = str((names[index] if index < len(names) else None) or chosen["name"]).strip() or chosen["name"]
        try:
            clusters = add_cluster(from_supernodes(supernodes or []), title, list(chosen["members"]))
            document = state.document(name)
            save_clusters(document, clusters)
            state.library.saved(name, document)
        except (ValueError, CLTError, OSError) as err:
            return proposals, supernodes, html.Span(f"not saved: {err}", className="warn")
        return proposals, to_supernodes(clusters), f"accepted “{title}”; saved to {document.path.name}"


def _data(**values: str) -> dict[str, Any]:
    return {f"data-{k}": v for k, v in values.items()}


def _name_input(index: int, value: str) -> Any:
    return dcc.Input(id={"type": "proposal-name", "index": index}, value=value, type="text", debounce=False)
