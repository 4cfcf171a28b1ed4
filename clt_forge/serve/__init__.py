"""`clt serve`: a local Dash interface to explore attribution graphs, cluster features and intervene.

graphs.py     which graph files may be opened (reading one is artifacts/graph.py's read_graph)
pruning.py    re-pruning at other thresholds (exactly, from the raw graph beside the JSON)
layout.py     node positions (boxes on a token position x layer grid) and the axes
style.py      the Cytoscape stylesheet and colours
subgraph.py   the subgraph view of the pinned nodes (clusters as one node)
proposals.py  proposed clusters: features whose effects are alike (docs/serve.md)
features.py   a feature's explanation, examples, histogram and logits (database or files)
panel.py      the node panel, job list and logit chart (HTML text)
clusters.py   editing clusters (artifacts/graph.py's Cluster): add, remove, collapse, export a subgraph
jobs.py       intervention jobs: a worker process, a queue, job states on disk
state.py      what is drawn: views, their cached drawings, node panels
page.py       the page's components
app.py        the Dash app: the page, and each concern's callbacks registered on it
callbacks/    one module per concern (graph view, node panel, clusters, interventions, jobs, pins,
              proposals):
              its Dash callbacks and the routes the page fetches drawings and panels from
server.py     `launch_interface`: serve the app (blocking, or in a thread with a handle)
assets/       the browser side: click / hover / selection handlers and the style sheet
"""

from __future__ import annotations

from clt_forge.serve.server import ServeHandle, launch_interface

__all__ = ["ServeHandle", "launch_interface"]
