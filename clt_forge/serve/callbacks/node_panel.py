"""The node panel: the panel of a clicked node, fetched by the page's script the moment it is tapped.

assets/serve.js asks `/_clt/panel` for the panel's HTML (state.panel_html) and reports the
click through the `clicked` store; a panel that Dash sets (`panel-html`, emptied when a graph
opens) is filled into the page by the script, so the HTML never passes through Dash's renderer.
"""

from __future__ import annotations

import json
from typing import Any

from dash import Dash, Input, Output

from clt_forge.errors import CLTError
from clt_forge.serve.panel import empty_panel
from clt_forge.serve.state import ServeState, View, panel_html

__all__ = ["fill", "register"]


def register(app: Dash, state: ServeState) -> None:
    """The panel route, and the panel filled into the page."""

    @app.server.route("/_clt/panel", methods=["POST"])
    def panel_route() -> Any:
        """The panel of a clicked node, fetched by assets/serve.js the moment the node is tapped."""
        from flask import request

        try:
            asked = json.loads(request.get_data(as_text=True))
            return panel_html(state, View.parse(str(asked["view"])), str(asked["node"]))
        except (CLTError, ValueError, TypeError, KeyError) as err:
            return empty_panel(f"No panel: {err}")

    fill(app, "panel-html", "panel")


def fill(app: Dash, store: str, target: str) -> None:
    """The HTML in the `store` goes into the element `target` (assets/serve.js writes it)."""
    app.clientside_callback(
        f"function(html) {{ return window.cltServe.fill('{target}', html); }}",
        Output(f"{store}-shown", "data"),
        Input(store, "data"),
    )
