"""Read row ranges of a tensor in a .safetensors file with plain file reads (no memory map).

A .safetensors file is an 8-byte little-endian header length N, N bytes of JSON ({name: {"dtype",
"shape", "data_offsets": [begin, end]}}, optional "__metadata__"), then the tensors' bytes,
row-major and little-endian, at 8 + N + begin. Rows start .. stop - 1 along dim 0 are therefore
one contiguous byte range, which `TensorFile.rows` reads into a fresh buffer of exactly that size.

Why not safetensors' own `safe_open`: on CPU it maps the file, and every page a read touches
stays in the process's resident set until the handle and every tensor taken from it are gone,
so reading a whole file piece by piece still costs the file's size on top of the copies. Read
here, a caller that copies chunk by chunk into its own tensors holds its tensors plus one chunk
(the kernel's page cache keeps what it likes, outside the process). benchmarks/foreign_memory.py
measures it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from clt_forge.errors import CLTError

__all__ = ["CHUNK_BYTES", "TensorFile"]

CHUNK_BYTES = 64 << 20  # what `chunks` reads at a time: small next to any CLT worth streaming
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorFile:
    """The header of one .safetensors file, and reads of its tensors' rows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length))
        except (OSError, ValueError) as exc:
            raise CLTError(f"{path}: not a readable .safetensors file ({exc}).") from exc
        self.data_start = 8 + length
        self.entries: dict[str, dict[str, Any]] = {k: v for k, v in header.items() if k != "__metadata__"}

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> list[int]:
        return list(self.entry(key)["shape"])

    def entry(self, key: str) -> dict[str, Any]:
        if key not in self.entries:
            raise CLTError(f"{self.path}: key {key} is missing.")
        return self.entries[key]

    def rows(self, key: str, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start .. stop - 1 (dim 0) of tensor `key`, in the file's dtype, on the CPU (in
        `buffer`, a uint8 tensor of at least their size, where given)."""
        entry = self.entry(key)
        if entry["dtype"] not in DTYPES:
            raise CLTError(f"{self.path}: {key} has dtype {entry['dtype']}; readable: {', '.join(DTYPES)}.")
        dtype, shape = DTYPES[entry["dtype"]], list(entry["shape"])
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        size = (stop - start) * row_bytes
        target = torch.empty(size, dtype=torch.uint8) if buffer is None else buffer[:size]
        with open(self.path, "rb") as handle:
            handle.seek(self.data_start + entry["data_offsets"][0] + start * row_bytes)
            got = handle.readinto(target.numpy().data)
        if got != size:
            raise CLTError(f"{self.path}: {key} is cut short (read {got} of {size} bytes); the file is truncated.")
        return target.view(dtype).view(stop - start, *shape[1:])

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor `key` (for small ones: biases, thresholds)."""
        shape = self.shape(key)
        whole = self.rows(key, 0, shape[0] if shape else 1)
        return whole if shape else whole.view(())

    def chunks(self, key: str, limit: int | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, rows start .. stop - 1) of `key`, about `limit` (default CHUNK_BYTES)
        bytes at a time (at least one row). Each chunk is read into the same buffer, so it is
        valid until the next one: copy it away. (One buffer, not one per chunk: freed buffers of
        tens of MB come back from malloc's heap, not the OS, and fragment it; fresh ones per chunk
        cost up to 0.5x of the loaded model in RSS, measured.)"""
        entry = self.entry(key)
        shape = list(entry["shape"])
        row_bytes = max(1, math.prod(shape[1:]) * DTYPES.get(entry["dtype"], torch.uint8).itemsize)
        step = max(1, (limit or CHUNK_BYTES) // row_bytes)
        buffer = torch.empty(min(step, shape[0]) * row_bytes, dtype=torch.uint8)
        for start in range(0, shape[0], step):
            stop = min(shape[0], start + step)
            yield start, stop, self.rows(key, start, stop, buffer)
