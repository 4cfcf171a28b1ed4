"""Freed tensor memory kept in the process for the next tensors (glibc's malloc), for CPU training.

The one job of this file: `keep_freed_memory()`. glibc serves each allocation above its mmap
threshold (32 MiB at most) from a fresh mapping and unmaps it when freed, so every large tensor a
CPU training step makes ([B, L, F] masks and loss terms, the activation's outputs, W_dec-sized
scratch) is page-faulted in again at every step. With mmap off for malloc (M_MMAP_MAX 0) they come
from the heap instead, and with a high M_TRIM_THRESHOLD the heap keeps what was freed, so a step
reuses the previous step's pages. At issue 18's shape (docs/performance.md, "Freed memory kept")
one elementwise op on a [256, 30, 4608] tensor took 150-185 ms inside a training step on fresh
pages and 5.5 ms on reused ones.

The cost: the process keeps its peak heap until it exits (memory is not returned to the system
between steps), and the heap can fragment. `clt train` sets it on CPU after the first step,
once the long-lived tensors (the CLT, Adam's state) are in their own mappings, so only the
per-step tensors share the heap (set before the first step, the peak RSS at that shape grew by
0.6-2 GiB); `keep_freed_memory=false` leaves malloc alone. It is process-wide and cannot be
undone. Reuse is usual, not certain: in some heap layouts torch's 2 MiB alignment (under
THP_MEM_ALLOC_ENABLE, which importing clt_forge sets) does not fit a freed block, and the heap
grows by a block or a few before it stops (tests/test_heap.py). Elsewhere (macOS, musl, Windows)
it does nothing.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # bytes free at the heap's top before it is given back: the largest allowed


def keep_freed_memory() -> bool:
    """Set malloc to serve large blocks from the heap and keep what is freed (see the module
    docstring); True where it took effect (glibc), False where there is no such malloc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
