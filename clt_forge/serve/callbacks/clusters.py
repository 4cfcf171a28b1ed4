"""The clusters panel: the selection, making and removing clusters, their list, subgraph export.

Nodes are selected in the page (shift+click, shift+drag; assets/serve.js reports them through
the `selection` store). Clusters live in the `clusters` store as `qParams.supernodes` lists
and are written to the graph file as soon as they change (artifacts.graph.save_clusters);
the cluster logic itself is serve/clusters.py.
"""

from __future__ import annotations

import json
from typing import Any

from dash import ALL, Dash, Input, Output, State, ctx, html, no_update
from dash.exceptions import PreventUpdate

from clt_forge.artifacts.graph import Cluster, from_supernodes, save_clusters, to_supernodes
from clt_forge.errors import CLTError
from clt_forge.serve.clusters import add_cluster, remove_cluster, subgraph
from clt_forge.serve.layout import CLUSTER_COLOURS
from clt_forge.serve.state import ServeState

__all__ = ["register"]


def register(app: Dash, state: ServeState) -> None:
    """The selection note, cluster edits (saved at once), the cluster list and the export."""
    _edits(app, state)
    _listing(app)
    _export(app, state)


def _edits(app: Dash, state: ServeState) -> None:
    @app.callback(
        Output("selection-note", "children"),
        Input("selection", "data"),
    )
    def selection_note(selection: list[str] | None) -> str:
        if not selection:
            return "Shift+click or shift+drag to select nodes."
        return f"{len(selection)} node{'s' if len(selection) != 1 else ''} selected."

    @app.callback(
        Output("clusters", "data", allow_duplicate=True),
        Output("cluster-status", "children"),
        Output("cluster-name", "value"),
        Input("cluster-create", "n_clicks"),
        Input({"type": "cluster-delete", "name": ALL}, "n_clicks"),
        State("cluster-name", "value"),
        State("selection", "data"),
        State("clusters", "data"),
        State("graph-key", "data"),
        prevent_initial_call=True,
    )
    def edit_clusters(
        _create: int | None,
        deletes: list[int | None],
        cluster_name: str | None,
        selection: list[str] | None,
        supernodes: list[list[str]],
        name: str | None,
    ) -> tuple[Any, ...]:
        trigger = ctx.triggered_id
        if not name or trigger is None:
            raise PreventUpdate
        clusters = from_supernodes(supernodes or [])
        try:
            if trigger == "cluster-create":
                members = _expand(selection or [], clusters)
                chosen = (cluster_name or "").strip() or f"cluster {len(clusters) + 1}"
                clusters = add_cluster(clusters, chosen, members)
                done = f"“{chosen}”: {len(members)} nodes"
            else:
                if not any(deletes):
                    raise PreventUpdate
                clusters = remove_cluster(clusters, trigger["name"])
                done = f"removed “{trigger['name']}”"
            document = state.document(name)
            save_clusters(document, clusters)
            state.library.saved(name, document)
        except ValueError as err:
            return no_update, html.Span(str(err), className="warn"), no_update
        except CLTError as err:
            return no_update, html.Span(f"not saved: {err}", className="warn"), no_update
        except OSError as err:
            return no_update, html.Span(f"not saved: {err}", className="warn"), no_update
        return to_supernodes(clusters), f"{done}; saved to {document.path.name}", ""


def _listing(app: Dash) -> None:
    @app.callback(
        Output("cluster-list", "children"),
        Input("clusters", "data"),
    )
    def list_clusters(supernodes: list[list[str]] | None) -> Any:
        clusters = from_supernodes(supernodes or [])
        if not clusters:
            return html.Div("No clusters yet.", className="muted")
        return html.Ul(
            [
                html.Li(
                    [
                        html.I(className="swatch", style={"background": CLUSTER_COLOURS[i % len(CLUSTER_COLOURS)]}),
                        html.Span(c.name, className="cluster-name"),
                        html.Span(f"{len(c.members)} nodes", className="muted"),
                        html.Button(
                            "×",
                            id={"type": "cluster-delete", "name": c.name},
                            className="link-btn",
                            title=f"remove {c.name}",
                        ),
                    ],
                    **_data(cluster=c.name),
                )
                for i, c in enumerate(clusters)
            ],
            className="cluster-list",
        )


def _export(app: Dash, state: ServeState) -> None:
    @app.callback(
        Output("download", "data"),
        Input("export", "n_clicks"),
        State("graph-key", "data"),
        State("selection", "data"),
        State("node-threshold", "value"),
        State("edge-threshold", "value"),
        State("clusters", "data"),
        prevent_initial_call=True,
    )
    def export(
        _clicks: int,
        name: str | None,
        selection: list[str] | None,
        node_t: float,
        edge_t: float,
        supernodes: list[list[str]],
    ) -> Any:
        if not name:
            raise PreventUpdate
        document = state.document(name)
        view = state.view(name, node_t, edge_t)
        data = subgraph(document, view, list(selection or []), from_supernodes(supernodes or []))
        return {"content": json.dumps(data, indent=1), "filename": f"{document.slug}-subgraph.json"}


def _data(**values: str) -> dict[str, Any]:
    """data-* attributes for a Dash html component."""
    return {f"data-{k}": v for k, v in values.items()}


def _expand(selection: list[str], clusters: list[Cluster]) -> list[str]:
    """Selected ids, with collapsed cluster nodes replaced by their members."""
    named = {f"cluster:{c.name}": c.members for c in clusters}
    out: list[str] = []
    for node_id in selection:
        out.extend(named.get(node_id, (node_id,)))
    return list(dict.fromkeys(out))
