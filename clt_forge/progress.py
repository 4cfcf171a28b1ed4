"""Progress of a long stage on stderr: tqdm's bar on a terminal, one line at a steady interval elsewhere.

tqdm hides its bar when stderr is not a terminal (`disable=None`), so a SLURM log or a
`> log 2>&1` stays silent for the whole stage. `progress_bar` takes tqdm's arguments and
returns tqdm's bar on a TTY; on anything else a `LineProgress` writing

    clt train: 1.28M/10.2M tok (12.5%), 5.31k tok/s, elapsed 0:04:01, ETA 0:28:02, loss=0.0213, l0=31.2

when it starts, every `interval` seconds (at the first update past it) and once when it closes.
Both have `update(n)`, `set_postfix(**values)`, `close()` and work as context managers, so a
stage swaps `tqdm(...)` for `progress_bar(...)` and nothing else.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

from tqdm import tqdm

INTERVAL_S = 30.0  # a line per half minute: readable in a log, frequent enough to see a stall


def progress_bar(
    total: float | None = None,
    *,
    desc: str = "",
    unit: str = "it",
    unit_scale: bool = False,
    initial: float = 0,
    disable: bool | None = None,
    file: IO[str] | None = None,
    interval: float = INTERVAL_S,
    **tqdm_kwargs: Any,
) -> tqdm | LineProgress:
    """tqdm's bar on a terminal; lines every `interval` seconds elsewhere; nothing when `disable` is True."""
    stream = file if file is not None else sys.stderr
    if disable or stream.isatty():
        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=unit_scale,
            initial=initial,
            disable=bool(disable),
            file=stream,
            **tqdm_kwargs,
        )
    return LineProgress(
        total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial, file=stream, interval=interval
    )


class LineProgress:
    """One self-contained line per interval: done/total, share, rate since start, elapsed, ETA."""

    def __init__(
        self,
        total: float | None,
        *,
        desc: str = "",
        unit: str = "it",
        unit_scale: bool = False,
        initial: float = 0,
        file: IO[str] | None = None,
        interval: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = self.initial = initial
        self.file = file if file is not None else sys.stderr
        self.interval, self.clock = interval, clock
        self.started = self.last = clock()
        self.postfix: dict[str, Any] = {}
        self.closed = False
        self._write()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.interval:
            self._write()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **values: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **values}

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self) -> str:
        now = self.clock()
        elapsed = now - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 and self.n > self.initial else None
        parts = [
            f"{self._count(self.n)}/{self._count(self.total)} {self.unit}"
            if self.total
            else f"{self._count(self.n)} {self.unit}"
        ]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.1f}%)"
        parts.append(f"{self._count(rate)} {self.unit}/s" if rate is not None else f"? {self.unit}/s")
        parts.append(f"elapsed {tqdm.format_interval(elapsed)}")
        if self.total and rate:
            parts.append(f"ETA {tqdm.format_interval(max(0.0, self.total - self.n) / rate)}")
        parts += [f"{key}={value}" for key, value in self.postfix.items()]
        return f"{self.desc}: {', '.join(parts)}" if self.desc else ", ".join(parts)

    def _count(self, value: float | None) -> str:
        if value is None:
            return "?"
        if self.unit_scale and value:
            return str(tqdm.format_sizeof(value))
        return f"{value:,.0f}" if float(value).is_integer() or value >= 100 else f"{value:.3g}"

    def _write(self) -> None:
        self.last = self.clock()
        print(self.line(), file=self.file, flush=True)
