"""The interventions panel: what to intervene on (a clicked feature or a cluster), and queueing a job.

A clicked CLT feature, then every cluster with CLT features in it, are the targets offered;
`queue_job` turns the target into (layer, position, feature) edits and submits them to the
intervention queue (serve/jobs.py), whose worker process runs them while the page stays free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dash import Dash, Input, Output, State, ctx, html, no_update
from dash.exceptions import PreventUpdate

from clt_forge.artifacts.graph import FEATURE, GraphDocument, NodeId, from_supernodes
from clt_forge.errors import CLTError
from clt_forge.serve.jobs import EditSpec, read_jobs
from clt_forge.serve.layout import node_title
from clt_forge.serve.panel import job_board
from clt_forge.serve.state import ServeState

__all__ = ["register"]


def register(app: Dash, state: ServeState) -> None:
    """The target picker, and the queue button."""

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
        try:
            document = state.document(name) if name else None
        except CLTError:  # the page shows the problem
            document = None
        clicked = _feature(document, node_id) if document and node_id else None
        if document and node_id and clicked:
            node = document.nodes_by_id.get(node_id) or {
                "node_id": node_id,
                "feature_type": FEATURE,
                "ctx_idx": clicked.pos,
            }
            options.append(
                {
                    "label": f"feature {node_title(node, document.prompt_tokens).split(':')[0]}",
                    "value": f"node:{node_id}",
                }
            )
        for cluster in from_supernodes(supernodes or []):
            n = len(cluster.features(document.n_layers)) if document else 0
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
            clicked = _feature(document, ident)
            features = [clicked] if clicked else []
            what = f"L{clicked.layer} #{clicked.index} @{clicked.pos}" if clicked else ident
        else:
            cluster = next((c for c in from_supernodes(supernodes or []) if c.name == ident), None)
            features = cluster.features(document.n_layers) if cluster else []
            what = f"“{ident}”"
        if not features:
            return _warn(f"{ident} has no CLT features to edit.")
        verb = f"× {amount:g}" if mode == "scale" else f"= {amount:g}"
        edits = [EditSpec(*feature.layer_pos_feature, mode, float(amount)) for feature in features]
        model = document.metadata.get("model")
        number = state.jobs.submit(f"{what} {verb}", checkpoint, list(tokens), edits, model)
        numbers = [*(jobs or []), number]
        return numbers, f"queued job #{number}", job_board(read_jobs(state.jobs.folder, numbers)), False


def _feature(document: GraphDocument, node_id: str) -> NodeId | None:
    """The parsed id of `node_id` when it is a CLT feature of the graph (None otherwise)."""
    try:
        parsed = document.parse(node_id)
    except ValueError:
        return None
    return parsed if parsed.kind is FEATURE else None


def _warn(message: str) -> tuple[Any, Any, Any, Any]:
    """queue_job's answer when nothing was queued: the message, nothing else changed."""
    return no_update, html.Span(message, className="warn"), no_update, no_update
