"""`launch_interface`: serve the `clt serve` app on a local address.

    handle = launch_interface("runs/demo/graphs", block=False)   # returns once it listens
    print(handle.url)                                            # http://127.0.0.1:8050/
    handle.stop()

It binds 127.0.0.1 unless told otherwise and serves with a threaded WSGI server (werkzeug),
so a slow request never holds up the others. `block=True` (the CLI) serves until Ctrl+C;
`block=False` serves from a background thread and returns a `ServeHandle` (also a context
manager). Intervention jobs keep their queue, states and worker log in `cache_dir`
(default: a temporary folder removed by `stop()`). This module imports Dash only when
called, so the worker process of jobs.py starts without it.
"""

from __future__ import annotations

import logging
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clt_forge.errors import CLTError

__all__ = ["ServeHandle", "launch_interface"]


@dataclass
class ServeHandle:
    """A running interface: its `url`, and `stop()` (idempotent)."""

    url: str
    server: Any = field(repr=False)
    jobs: Any = field(repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)
    warming: threading.Thread | None = field(default=None, repr=False)
    scratch: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)
    stopped: bool = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join(10)
        self.server.server_close()
        if self.warming is not None:
            # Python must not exit while this thread is inside torch: its thread pool would
            # be torn down under it ("terminate called without an active exception").
            self.warming.join()
        self.jobs.stop()
        if self.scratch is not None:
            self.scratch.cleanup()

    def __enter__(self) -> ServeHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch_interface(
    graph: str | Path,
    features_path: str | Path | None = None,
    checkpoint: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8050,
    block: bool = True,
    cache_dir: str | Path | None = None,
    threads: int = 0,
) -> ServeHandle:
    """Serve the graph JSON `graph` (or every graph JSON in the folder `graph`).

    features_path: a feature database or folder of feature files (default: the one each graph
    records); checkpoint: the CLT checkpoint interventions use (default: the graph's);
    port=0 picks a free port; threads: torch threads of the intervention worker (0: torch's
    default). Returns once serving stops (block=True) or at once (block=False)."""
    from werkzeug.serving import make_server

    from clt_forge.serve.app import build_app
    from clt_forge.serve.graphs import GraphLibrary
    from clt_forge.serve.jobs import InterventionQueue
    from clt_forge.serve.state import ServeState, warm_up

    library = GraphLibrary(graph)
    if checkpoint and not Path(checkpoint).exists():
        raise CLTError(f"checkpoint={checkpoint}: no CLT checkpoint there (a folder written by `clt train`).")
    scratch = None
    if cache_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="clt-serve-")
        cache_dir = scratch.name
    cache = Path(cache_dir)
    jobs = InterventionQueue(cache / "jobs", threads=threads)
    try:
        state = ServeState(library, jobs, features_path=features_path, checkpoint=checkpoint)
        app = build_app(state)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        try:
            server = make_server(host, port, app.server, threaded=True)
        except OSError as err:
            raise CLTError(f"cannot listen on {host}:{port} ({err.strerror}); choose another with port=N.") from None
    except BaseException:
        jobs.stop()
        if scratch is not None:
            scratch.cleanup()
        raise
    warming = threading.Thread(target=warm_up, args=(state,), name="clt-serve-warm-up", daemon=True)
    warming.start()
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    handle = ServeHandle(f"http://{shown_host}:{server.server_port}/", server, jobs, warming=warming, scratch=scratch)
    if not block:
        handle.thread = threading.Thread(target=server.serve_forever, name="clt-serve", daemon=True)
        handle.thread.start()
        return handle
    print(f"clt serve: {handle.url} (Ctrl+C stops)", flush=True)
    previous = _stop_on_signals()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
        for number, handler in previous.items():
            signal.signal(number, handler)
    return handle


def _stop_on_signals() -> dict[int, Any]:
    """Ctrl+C (SIGINT) and SIGTERM stop a blocking server cleanly, also where SIGINT arrives
    ignored (a process started in the background by a non-interactive shell inherits SIG_IGN)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        previous[number] = signal.signal(number, signal.default_int_handler)
    return previous
