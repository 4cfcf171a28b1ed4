"""Running a test body on every rank of a real gloo process group (CPU processes)."""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spawn_ranks(body: Callable[..., None], world: int, *args: Any) -> None:
    """Run `body(rank, world, *args)` in `world` processes joined by one gloo group."""
    mp.spawn(_run_rank, args=(world, free_port(), body, *args), nprocs=world, join=True)


def _run_rank(rank: int, world: int, port: int, body: Callable[..., None], *args: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        body(rank, world, *args)
    finally:
        # The body's autograd graphs hold reference cycles; left to the interpreter's exit they are
        # freed after the group's threads are gone, and the process aborts now and then
        # ("terminate called without an active exception", about one run in ten under pytest).
        gc.collect()
        dist.destroy_process_group()
