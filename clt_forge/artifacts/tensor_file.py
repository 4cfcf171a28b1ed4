"""Read row ranges of a tensor in a .safetensors file with plain file reads (no memory map).

A .safetensors file is an 8-byte little-endian header length N, N bytes of JSON ({name: {"dtype",
"shape", "data_offsets": [begin, end]}}, optional "__metadata__"), then the tensors' bytes,
row-major and little-endian, at 8 + N + begin. Rows start .. stop - 1 along dim 0 are therefore
one contiguous byte range, which `TensorFile.rows` reads into a fresh buffer of exactly that size.
`lead` reads a tensor as rows over its first dims merged (a [P, F, D] matrix as P F rows of D);
`take` reads chosen rows in any order (a few features of a huge matrix: autointerp).

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
from collections.abc import Iterator, Sequence
from io import BufferedReader
from pathlib import Path
from typing import Any

import torch

from clt_forge.errors import CLTError

__all__ = ["CHUNK_BYTES", "GAP_BYTES", "TensorFile"]

CHUNK_BYTES = 64 << 20  # what `chunks` reads at a time: small next to any CLT worth streaming
GAP_BYTES = 32 << 10  # `take` reads through holes up to this size (about one extra read call's cost) rather than seek
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
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def scratch(self, size: int) -> torch.Tensor:
        """The buffer `chunks` and `take` read into, at least `size` bytes: one per file, kept
        between calls (a chunk is valid until the next read from this file). Reused, not
        allocated per call: freed buffers of tens of MB come back from malloc's heap, not the OS,
        and fragment it (a fresh 16 MiB one per layer cost 2 of them in RSS, measured)."""
        if self._scratch.numel() < size:
            self._scratch = torch.empty(0, dtype=torch.uint8)  # freed before the larger one is taken
            self._scratch = torch.empty(size, dtype=torch.uint8)
        return self._scratch

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> list[int]:
        return list(self.entry(key)["shape"])

    def entry(self, key: str) -> dict[str, Any]:
        if key not in self.entries:
            raise CLTError(f"{self.path}: key {key} is missing.")
        return self.entries[key]

    def layout(self, key: str, lead: int = 1) -> tuple[torch.dtype, int, list[int], int]:
        """(dtype, row count, row shape, bytes per row) of `key` seen as rows over its first `lead`
        dims merged (lead=2 on a [P, F, D] tensor: P * F rows of [D])."""
        entry = self.entry(key)
        if entry["dtype"] not in DTYPES:
            raise CLTError(f"{self.path}: {key} has dtype {entry['dtype']}; readable: {', '.join(DTYPES)}.")
        dtype, shape = DTYPES[entry["dtype"]], list(entry["shape"])
        row_shape = shape[lead:]
        return dtype, math.prod(shape[:lead]), row_shape, math.prod(row_shape) * dtype.itemsize

    def rows(self, key: str, start: int, stop: int, buffer: torch.Tensor | None = None, lead: int = 1) -> torch.Tensor:
        """Rows start .. stop - 1 (of the first `lead` dims merged) of tensor `key`, in the file's
        dtype, on the CPU (in `buffer`, a uint8 tensor of at least their size, where given)."""
        with open(self.path, "rb") as handle:
            return self._read(handle, key, start, stop, buffer, lead)

    def _read(
        self, handle: BufferedReader, key: str, start: int, stop: int, buffer: torch.Tensor | None, lead: int
    ) -> torch.Tensor:
        dtype, _, row_shape, row_bytes = self.layout(key, lead)
        size = (stop - start) * row_bytes
        target = torch.empty(size, dtype=torch.uint8) if buffer is None else buffer[:size]
        handle.seek(self.data_start + self.entry(key)["data_offsets"][0] + start * row_bytes)
        got = handle.readinto(target.numpy().data)
        if got != size:
            raise CLTError(f"{self.path}: {key} is cut short (read {got} of {size} bytes); the file is truncated.")
        return target.view(dtype).view(stop - start, *row_shape)

    def take(self, key: str, index: Sequence[int], lead: int = 1) -> torch.Tensor:
        """Rows `index` (of the first `lead` dims merged; any order) of `key`: [len(index), *row
        shape], in the file's dtype. Rows at most GAP_BYTES apart are read in one span (of at most
        CHUNK_BYTES, into `scratch`) and the wanted ones copied out: a few features' rows of a
        huge matrix cost their own size plus one span, never the matrix."""
        dtype, count, row_shape, row_bytes = self.layout(key, lead)
        wanted = sorted(set(index))
        if wanted and not 0 <= wanted[0] <= wanted[-1] < count:
            raise CLTError(f"{self.path}: rows {wanted[0]}..{wanted[-1]} of {key} asked for; it has {count}.")
        span = max(1, CHUNK_BYTES // max(1, row_bytes))
        gap = max(1, GAP_BYTES // max(1, row_bytes))
        runs, first = [], 0  # [first, last) positions in `wanted` read at once
        while first < len(wanted):
            last = first + 1
            while last < len(wanted) and wanted[last] - wanted[last - 1] <= gap and wanted[last] < wanted[first] + span:
                last += 1
            runs.append((first, last))
            first = last
        out = torch.empty(len(wanted), *row_shape, dtype=dtype)
        buffer = self.scratch(max((wanted[b - 1] + 1 - wanted[a] for a, b in runs), default=0) * row_bytes)
        with open(self.path, "rb") as handle:
            for first, last in runs:
                start, stop = wanted[first], wanted[last - 1] + 1
                block = self._read(handle, key, start, stop, buffer, lead)
                out[first:last] = block[torch.tensor(wanted[first:last]) - start]
        if list(index) == wanted:
            return out
        where = {row: i for i, row in enumerate(wanted)}
        return out[torch.tensor([where[row] for row in index], dtype=torch.int64)]

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor `key` (for small ones: biases, thresholds)."""
        shape = self.shape(key)
        whole = self.rows(key, 0, shape[0] if shape else 1)
        return whole if shape else whole.view(())

    def chunks(
        self, key: str, limit: int | None = None, lead: int = 1, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, rows start .. stop - 1) of `key` (of its first `lead` dims merged; rows
        `start` .. `stop` - 1 only, where given), about `limit` (default CHUNK_BYTES) bytes at a
        time (at least one row). Each chunk is read into the file's one buffer (`scratch`), so it is
        valid until the next read: copy it away. (Fresh buffers per chunk cost up to 0.5x of the
        loaded model in RSS, measured.)"""
        _, count, _, row_bytes = self.layout(key, lead)
        stop = count if stop is None else stop
        row_bytes = max(1, row_bytes)
        step = max(1, (limit or CHUNK_BYTES) // row_bytes)
        buffer = self.scratch(min(step, max(0, stop - start)) * row_bytes)
        with open(self.path, "rb") as handle:
            for first in range(start, stop, step):
                last = min(stop, first + step)
                yield first, last, self._read(handle, key, first, last, buffer, lead)
