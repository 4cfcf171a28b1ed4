"""keep_freed_memory: large tensors come from malloc's heap instead of fresh mappings, stay there
when freed, and later ones of the size take the freed space, so the heap stops growing (`clt
train` sets it on CPU after the first step: tests/test_train.py). Checked with glibc's own
accounting (mallinfo2): whether a page is faulted again depends on the heap's layout."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json, sys
import torch
from clt_forge.heap import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
rows = []
for _ in range(10):
    tensor = torch.ones(16 * 2**20)  # 64 MiB, above glibc's largest mmap threshold
    held = libc.mallinfo2()
    del tensor
    freed = libc.mallinfo2()
    rows.append({"heap": held.arena, "mapped": held.hblkhd, "heap_free_after": freed.fordblks})
print(json.dumps({"kept": kept, "rows": rows}))
"""
MIB = 2**20


def probe(mode: str) -> dict:
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1", "OMP_NUM_THREADS": "1"}  # as importing clt_forge sets it
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="glibc's malloc (>= 2.33 for mallinfo2): what keep_freed_memory sets",
)
def test_large_tensors_come_from_the_heap_and_reuse_it() -> None:
    system, keep = probe("system"), probe("keep")
    assert system["kept"] is None and all(row["mapped"] >= 64 * MIB for row in system["rows"])  # own mappings
    assert keep["kept"] is True
    heap = [row["heap"] for row in keep["rows"]]
    for row in keep["rows"]:
        assert row["mapped"] < 64 * MIB and row["heap"] >= 64 * MIB  # served from the heap
        assert row["heap_free_after"] >= 64 * MIB  # freed, it stays in the process
    # The next tensors take the freed space. Usually at once; in some heap layouts torch's 2 MiB
    # alignment does not fit the freed block and the heap grows by a block or three, then stops.
    assert heap[-4:] == [heap[-1]] * 4 and heap[-1] <= heap[0] + 5 * 64 * MIB
