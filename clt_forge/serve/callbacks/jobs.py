"""The job board: intervention jobs as the worker reports them, polled while any is pending.

While a job is queued or running, the `jobs-poll` interval re-reads the job board (a
diskcache, serve/jobs.py) and sends it to the page when it changed, then switches itself off
once every job has finished; the page's script fills the board and the logit chart in.
"""

from __future__ import annotations

from typing import Any

from dash import Dash, Input, Output, State, no_update

from clt_forge.serve.callbacks.node_panel import fill
from clt_forge.serve.jobs import read_jobs
from clt_forge.serve.panel import job_board
from clt_forge.serve.state import ServeState

__all__ = ["register"]


def register(app: Dash, state: ServeState) -> None:
    """The board filled into the page, and its polling."""
    fill(app, "jobs-live", "jobs-view")

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
