"""Intervention jobs: one worker process, a first-in first-out queue, and job states on disk.

Submitting returns at once. The worker is a separate Python process
(`python -m clt_forge.serve.jobs FOLDER`, started on the first job: it shares no threads with
the server and never re-runs the user's script, as a multiprocessing `spawn` child would).
It loads the replacement model of a checkpoint once (`AttributionRunner`) and runs jobs one
after another with `clt_forge.attribution.interventions`, taking them from a
`diskcache.Deque` in the serve cache folder; it writes its output to `worker.log` there and
exits when asked to, or when the server process is gone. Each job's state is a record in a
`diskcache.Cache` in the same folder, readable from any process:

    {"number", "label", "status": queued | running | done | failed, "stage", "ahead",
     "seconds", "error", "result": {"top_before", "top_after", "largest_changes", "edits"}}

The page polls the records while jobs are pending (app.py's `jobs-poll`, one cheap read of
this cache), so neither waiting nor computing ever holds up the web server.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache

__all__ = ["EditSpec", "InterventionQueue", "JobSpec", "read_jobs"]

WORKER_PID = "worker:pid"
STOP = "worker:stop"


@dataclass(frozen=True)
class EditSpec:
    layer: int
    pos: int
    feature: int
    mode: str  # "set" | "scale"
    amount: float


@dataclass(frozen=True)
class JobSpec:
    number: int
    label: str
    checkpoint: str
    tokens: list[int]
    edits: list[EditSpec]
    model: str | None = None  # the model config the graph was attributed with (its metadata "model")


class InterventionQueue:
    """Submit jobs to the worker; stop it (see the module docstring)."""

    def __init__(self, folder: Path, threads: int = 0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.board = diskcache.Cache(str(self.folder))
        self.queue = diskcache.Deque(directory=str(self.folder / "queue"))
        self.threads = threads
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None

    def submit(
        self, label: str, checkpoint: str, tokens: list[int], edits: list[EditSpec], model: str | None = None
    ) -> int:
        with self._lock:
            number = int(self.board.incr("jobs:count"))
            self.board.set(f"job:{number}", {"number": number, "label": label, "status": "queued", "stage": ""})
            self.queue.append(JobSpec(number, label, checkpoint, list(tokens), list(edits), model))
            self._ensure_worker()
        return number

    def _ensure_worker(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        self.board.delete(STOP)
        with open(self.folder / "worker.log", "ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "clt_forge.serve.jobs", str(self.folder), str(self.threads), str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.board.set(WORKER_PID, self._process.pid)

    def stop(self) -> None:
        """Ask the worker to finish its job and exit; kill it if it has not within 10 s."""
        with self._lock:
            if self._process is not None:
                self.board.set(STOP, True)
                try:
                    self._process.wait(10)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(5)
                self._process = None
            self.board.close()


def read_jobs(folder: Path, numbers: list[int]) -> list[dict[str, Any]]:
    """The records of jobs `numbers` (any process may call this), with `ahead` filled in for
    queued jobs; jobs left unfinished by a worker that died are reported as failed."""
    import psutil

    with diskcache.Cache(str(folder)) as board:
        jobs = [board.get(f"job:{n}") for n in numbers]
        pid = board.get(WORKER_PID)
    jobs = [job for job in jobs if job is not None]
    alive = False
    if pid is not None:
        try:
            alive = psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
    pending = [job["number"] for job in jobs if job["status"] in ("queued", "running")]
    for job in jobs:
        if job["status"] in ("queued", "running") and not alive:
            job.update(status="failed", error="the intervention worker exited; queue the job again")
        elif job["status"] == "queued":
            job["ahead"] = sum(1 for n in pending if n < job["number"])
    return jobs


def _worker(folder: str, threads: int, parent: int) -> None:
    """The worker process: run queued jobs until told to stop or the server is gone."""
    import gc

    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    board = diskcache.Cache(folder)
    queue = diskcache.Deque(directory=str(Path(folder) / "queue"))
    runners: dict[tuple[str, str | None], Any] = {}
    while not board.get(STOP) and _alive(parent):
        try:
            spec = queue.popleft()
        except IndexError:
            time.sleep(0.05)
            continue
        job = board.get(f"job:{spec.number}") or {"number": spec.number, "label": spec.label}
        job.update(status="running", stage="")
        started = time.perf_counter()
        try:
            runner = runners.get((spec.checkpoint, spec.model))
            if runner is None:
                runners.clear()  # one model in memory at a time
                gc.collect()
                board.set(f"job:{spec.number}", dict(job, stage="loading the model"))
                runner = runners[(spec.checkpoint, spec.model)] = _load_runner(spec.checkpoint, spec.model)
            board.set(f"job:{spec.number}", job)
            result = runner.intervene(spec.tokens, [_edit(e) for e in spec.edits])
            job.update(status="done", result=_plain(result))
        except Exception as err:  # a failed job is reported on the page; the worker goes on
            from clt_forge.errors import CLTError

            job.update(status="failed", error=str(err) if isinstance(err, CLTError) else f"{type(err).__name__}: {err}")
        job["seconds"] = time.perf_counter() - started
        board.set(f"job:{spec.number}", job)
    runners.clear()  # circuit-tracer's ReplacementModel.__del__ fails if it runs at interpreter exit
    gc.collect()
    board.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return os.getppid() == pid


def _load_runner(checkpoint: str, model: str | None = None) -> Any:
    """The replacement model of `checkpoint`: on the model config it records, or, for an imported
    CLT (which records none, issue 20), on `model`, the one its graph was attributed with."""
    from clt_forge.artifacts.checkpoint import read_info
    from clt_forge.attribution.runner import AttributionRunner
    from clt_forge.config.schema import AttributionSettings

    recorded = read_info(checkpoint).model.get("name")
    return AttributionRunner(checkpoint, None if recorded else model, settings=AttributionSettings(verbose=False))


def _edit(spec: EditSpec) -> Any:
    from clt_forge.attribution.interventions import FeatureEdit

    if spec.mode == "set":
        return FeatureEdit(spec.layer, spec.pos, spec.feature, value=spec.amount)
    return FeatureEdit(spec.layer, spec.pos, spec.feature, scale=spec.amount)


def _plain(result: Any) -> dict[str, Any]:
    return {
        "top_before": [dataclasses.asdict(c) for c in result.top_before],
        "top_after": [dataclasses.asdict(c) for c in result.top_after],
        "largest_changes": [dataclasses.asdict(c) for c in result.largest_changes],
        "edits": [list(e) for e in result.edits],
    }


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
