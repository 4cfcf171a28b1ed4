"""The Dash callbacks and routes of `clt serve`, one module per concern; each has `register(app, state)`.

graph_view.py     which graph is shown and at which thresholds; the routes its drawings come from
node_panel.py     the panel of a clicked node (a route, filled into the page by its script)
clusters.py       the selection, making and removing clusters, the cluster list, subgraph export
interventions.py  what to intervene on, and queueing an intervention job
jobs.py           the job board, polled while jobs are queued or running
"""
