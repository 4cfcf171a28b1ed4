"""The Dash app of `clt serve`: the page, with the callbacks and routes of each concern registered on it.

Each concern is a module of serve/callbacks/ with a `register(app, state)`: the graph view
(which graph, which thresholds, the routes its drawings come from), the node panel, the
clusters, the interventions and the job board. The page's script (assets/serve.js) fetches
drawings and panels from the routes, so large payloads never pass through Dash's renderer,
and reports clicks and selections back through the `clicked` and `selection` stores.
"""

from __future__ import annotations

from pathlib import Path

from dash import Dash

from clt_forge.serve.callbacks import clusters, graph_view, interventions, jobs, node_panel, pins, proposals
from clt_forge.serve.page import page
from clt_forge.serve.state import ServeState

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
    for concern in (graph_view, node_panel, clusters, interventions, jobs, pins, proposals):
        concern.register(app, state)
    return app
