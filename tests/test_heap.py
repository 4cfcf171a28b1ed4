"""keep_freed_memory: a large tensor freed and made again reuses the process's pages (no new
page faults), where glibc's default maps fresh ones each time (`clt train` sets it on CPU:
tests/test_train.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
import torch
from clt_forge.heap import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.ones(16 * 2**20)  # 64 MiB, above glibc's largest mmap threshold
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del tensor
print(json.dumps({"kept": kept, "faults": faults}))
"""


def probe(mode: str) -> dict:
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1", "OMP_NUM_THREADS": "1"}  # as importing clt_forge sets it
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_freed_memory_is_reused_without_page_faults() -> None:
    """64 MiB is 32 faults in 2 MiB huge pages (torch asks for them) or 16,384 in 4 KiB ones."""
    system, keep = probe("system"), probe("keep")
    assert all(f >= 32 for f in system["faults"])  # a fresh mapping every time
    assert keep["kept"] is True
    assert keep["faults"][0] >= 32  # the first one is new memory either way
    assert all(f <= 8 for f in keep["faults"][1:])  # then the freed pages are reused
