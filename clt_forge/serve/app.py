"""The Dash app of `clt serve`: its callbacks, and the routes the page's script fetches from.

The address `?graph=NAME&links=N` (or the picker) picks a file of the GraphLibrary;
`open_graph` reads it and names the view to draw at its saved thresholds; the sliders, the
links control, the collapse switch and the clusters name another (`redraw`). Views travel as
keys (state.View): the page's script (assets/serve.js) fetches their elements from
`/_clt/initial` and `/_clt/elements`, and a clicked node's panel from `/_clt/panel`, so large
payloads never pass through Dash's renderer; it reports clicks and selections back through
the `clicked` and `selection` stores. Clusters are written to the graph file as soon as they
change. Interventions go to the queue of jobs.py (a worker process runs them); while any
is queued or running, the `jobs-poll` interval re-reads the job board (a diskcache) and
redraws it when it changed, then switches itself off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from dash import ALL, Dash, Input, Output, State, ctx, html, no_update
from dash.exceptions import PreventUpdate

from clt_forge.errors import CLTError
from clt_forge.serve.clusters import (
    Cluster,
    add_cluster,
    feature_members,
    from_supernodes,
    remove_cluster,
    save_clusters,
    subgraph,
    to_supernodes,
)
from clt_forge.serve.graphs import FEATURE
from clt_forge.serve.jobs import EditSpec, read_jobs
from clt_forge.serve.layout import CLUSTER_COLOURS, node_title
from clt_forge.serve.page import error_page, header, page
from clt_forge.serve.panel import empty_panel, job_board
from clt_forge.serve.pruning import feature_key
from clt_forge.serve.state import ServeState, View, graph_meta, links_param, panel_html, saved_thresholds

__all__ = ["build_app"]

ASSETS = Path(__file__).parent / "assets"


def build_app(state: ServeState) -> Dash:
    """The Dash app over `state`."""
    app = Dash(
        "clt_forge.serve",
        assets_folder=str(ASSETS),
        title="clt serve",
        suppress_callback_exceptions=True,
        update_title="",
    )
    app.layout = lambda: page(state)

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
        body = {"key": name, "view": view.key, **{k: drawing[k] for k in ("elements", "nodes", "edges", "extent")}}
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
        body = {k: drawing[k] for k in ("elements", "nodes", "edges", "extent")}
        return Response(json.dumps(body, separators=(",", ":")), mimetype="application/json")

    app.clientside_callback(
        "function(meta) { return window.cltServe.onGraph(meta); }",
        Output("cy-ready", "data"),
        Input("graph-meta", "data"),
    )

    @app.server.route("/_clt/panel", methods=["POST"])
    def panel_route() -> Any:
        """The panel of a clicked node, fetched by assets/serve.js the moment the node is tapped."""
        from flask import request

        try:
            asked = json.loads(request.get_data(as_text=True))
            return panel_html(state, View.parse(str(asked["view"])), str(asked["node"]))
        except (CLTError, ValueError, TypeError, KeyError) as err:
            return empty_panel(f"No panel: {err}")

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

    @app.callback(
        Output("target", "options"),
        Output("target", "value"),
        Input("clicked", "data"),
        Input("clusters", "data"),
        State("graph-key", "data"),
        State("target", "value"),
    )
    def targets(
        node_id: str | None, supernodes: list[list[str]] | None, name: str | None, current: str | None
    ) -> tuple[Any, Any]:
        options: list[dict[str, Any]] = []
        if node_id and name and _is_feature(node_id):
            document = state.document(name)
            node = document.nodes_by_id.get(node_id) or {
                "node_id": node_id,
                "feature_type": FEATURE,
                "ctx_idx": feature_key(node_id)[2],
            }
            options.append(
                {
                    "label": f"feature {node_title(node, document.prompt_tokens).split(':')[0]}",
                    "value": f"node:{node_id}",
                }
            )
        for cluster in from_supernodes(supernodes or []):
            n = len(feature_members(cluster))
            options.append(
                {
                    "label": f"cluster “{cluster.name}” ({n} features)",
                    "value": f"cluster:{cluster.name}",
                    "disabled": n == 0,
                }
            )
        values = [o["value"] for o in options]
        if ctx.triggered_id == "clicked" and options and options[0]["value"].startswith("node:"):
            return options, options[0]["value"]
        return options, current if current in values else (values[0] if values else None)

    @app.callback(
        Output("jobs", "data"),
        Output("queue-status", "children"),
        Output("jobs-live", "data"),
        Output("jobs-poll", "disabled"),
        Input("queue", "n_clicks"),
        State("target", "value"),
        State("mode", "value"),
        State("amount", "value"),
        State("graph-key", "data"),
        State("clusters", "data"),
        State("jobs", "data"),
        prevent_initial_call=True,
    )
    def queue_job(
        _clicks: int,
        target: str | None,
        mode: str,
        amount: float | None,
        name: str | None,
        supernodes: list[list[str]] | None,
        jobs: list[int],
    ) -> tuple[Any, Any, Any, Any]:
        if not name:
            raise PreventUpdate
        if not target:
            return _warn("Choose what to intervene on: click a feature, or make a cluster.")
        if amount is None:
            return _warn("Give a number to scale by or set to.")
        document = state.document(name)
        checkpoint = state.checkpoint(document)
        if not checkpoint or not Path(checkpoint).exists():
            return _warn(f"No CLT checkpoint ({checkpoint or 'none recorded'}): start clt serve with checkpoint=PATH.")
        tokens = document.metadata.get("prompt_token_ids")
        if not tokens:
            return _warn("The graph records no prompt_token_ids to run the model on.")
        kind, _, ident = target.partition(":")
        if kind == "node":
            layer, feature, pos = feature_key(ident)
            members = [(layer, pos, feature)]
            what = f"L{layer} #{feature} @{pos}"
        else:
            cluster = next((c for c in from_supernodes(supernodes or []) if c.name == ident), None)
            members = feature_members(cluster) if cluster else []
            what = f"“{ident}”"
        if not members:
            return _warn(f"{ident} has no CLT features to edit.")
        verb = f"× {amount:g}" if mode == "scale" else f"= {amount:g}"
        edits = [EditSpec(layer, pos, feature, mode, float(amount)) for layer, pos, feature in members]
        number = state.jobs.submit(f"{what} {verb}", checkpoint, list(tokens), edits)
        numbers = [*(jobs or []), number]
        return numbers, f"queued job #{number}", job_board(read_jobs(state.jobs.folder, numbers)), False

    for store, target in (("panel-html", "panel"), ("jobs-live", "jobs-view")):
        app.clientside_callback(
            f"function(html) {{ return window.cltServe.fill('{target}', html); }}",
            Output(f"{store}-shown", "data"),
            Input(store, "data"),
        )

    @app.callback(
        Output("jobs-live", "data", allow_duplicate=True),
        Output("jobs-poll", "disabled", allow_duplicate=True),
        Input("jobs-poll", "n_intervals"),
        State("jobs", "data"),
        State("jobs-live", "data"),
        prevent_initial_call=True,
    )
    def poll_jobs(_ticks: int, numbers: list[int] | None, shown: str | None) -> tuple[Any, bool]:
        """The job board while jobs are queued or running; off once every job has finished."""
        jobs = read_jobs(state.jobs.folder, numbers or [])
        board = job_board(jobs)
        finished = all(job["status"] in ("done", "failed") for job in jobs)
        return (no_update if board == shown else board), finished

    return app


def _warn(message: str) -> tuple[Any, Any, Any, Any]:
    """queue_job's answer when nothing was queued: the message, nothing else changed."""
    return no_update, html.Span(message, className="warn"), no_update, no_update


def _data(**values: str) -> dict[str, Any]:
    """data-* attributes for a Dash html component."""
    return {f"data-{k}": v for k, v in values.items()}


def _is_feature(node_id: str) -> bool:
    parts = node_id.split("_")
    return len(parts) == 3 and all(p.isdigit() for p in parts)


def _expand(selection: list[str], clusters: list[Cluster]) -> list[str]:
    """Selected ids, with collapsed cluster nodes replaced by their members."""
    named = {f"cluster:{c.name}": c.members for c in clusters}
    out: list[str] = []
    for node_id in selection:
        out.extend(named.get(node_id, (node_id,)))
    return list(dict.fromkeys(out))
