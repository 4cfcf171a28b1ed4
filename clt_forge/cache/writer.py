"""Write an activation dataset: one caching job per shard, resumable, merged when all finish.

Shard `index` of `count` owns the context windows w with w % count == index among the first
ceil(tokens / tokens_per_window) windows of the train split. Its windows are grouped into
chunks of `windows_per_chunk`; chunk k is always the same windows, so a killed job (kill -9)
resumes after its last committed chunk and produces the same bytes. A chunk is committed by
(1) renaming its file into place, (2) rewriting the shard's part file, which lists it; the
model forward runs on the main thread while a background thread quantizes, compresses and
commits the previous chunk. When the last shard finishes, the parts are merged into
manifest.json (written last, atomically). Activations are read at the model config's hooks
(`model.hook_in` / `model.hook_out`; null: the MLP's own input and output, docs/hooks.md), which
the plan and the manifest's `hooks` record.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from clt_forge.artifacts.activations import (
    DEFAULT_HOOK_IN,
    DEFAULT_HOOK_OUT,
    HELD_OUT,
    MANIFEST,
    STATS,
    ChunkEntry,
    Manifest,
    atomic_write,
    checksum,
    encode_chunk,
    hook_names,
    read_manifest,
)
from clt_forge.artifacts.quant import QuantSpec
from clt_forge.artifacts.stats import KINDS, RunningStats
from clt_forge.config.plain import plain
from clt_forge.config.schema import CacheConfig, EncodeMode
from clt_forge.data.windows import token_windows, tokens_in_window
from clt_forge.errors import CLTError
from clt_forge.models.activations import configured_hooks, window_activations
from clt_forge.progress import progress_bar
from clt_forge.threads import torch_threads


@dataclasses.dataclass
class Plan:
    """Everything that must agree between the shards of one dataset and across resumes."""

    model: str
    model_id: str
    split: str
    quant: dict[str, Any]
    data: dict[str, Any]
    context_size: int
    prepend_bos: bool
    tokens: int
    windows_per_chunk: int
    shard_count: int
    hook_in: str = DEFAULT_HOOK_IN  # block-relative hook points read (model.hook_in / hook_out)
    hook_out: str = DEFAULT_HOOK_OUT

    @property
    def tokens_per_window(self) -> int:
        return tokens_in_window(self.context_size, self.prepend_bos)

    @property
    def n_windows(self) -> int:
        return math.ceil(self.tokens / self.tokens_per_window)

    @classmethod
    def from_config(
        cls, cfg: CacheConfig, split: str = "train", tokens: int | None = None, shards: int | None = None
    ) -> Plan:
        tokens_per_window = tokens_in_window(cfg.data.context_size, cfg.data.prepend_bos)
        return cls(
            model=cfg.model.name,
            model_id=model_id(cfg),
            split=split,
            quant=plain(cfg.quant),  # the QuantSpec's fields, in order, as JSON values
            data=plain(cfg.data),
            context_size=cfg.data.context_size,
            prepend_bos=cfg.data.prepend_bos,
            tokens=cfg.tokens if tokens is None else tokens,
            windows_per_chunk=max(1, cfg.chunk_tokens // tokens_per_window),
            shard_count=cfg.shard.count if shards is None else shards,
            hook_in=configured_hooks(cfg.model)[0],
            hook_out=configured_hooks(cfg.model)[1],
        )

    def differences(self, other: dict[str, Any]) -> list[str]:
        """What differs from a recorded plan (one written before the hooks were recorded read the MLP's)."""
        mine = dataclasses.asdict(self)
        other = {"hook_in": DEFAULT_HOOK_IN, "hook_out": DEFAULT_HOOK_OUT, **other}
        return [f"{key}: {other.get(key)!r} there, {mine[key]!r} now" for key in mine if other.get(key) != mine[key]]


def part_path(out: Path, index: int, count: int) -> Path:
    return out / "parts" / f"shard-{index:05d}-of-{count:05d}.json"


@dataclasses.dataclass
class Part:
    """A shard's progress file: which chunks are committed, and their statistics."""

    plan: dict[str, Any]
    index: int
    chunks: list[ChunkEntry]
    complete: bool = False
    stats_file: str | None = None

    def save(self, out: Path, count: int) -> None:
        atomic_write(part_path(out, self.index, count), json.dumps(dataclasses.asdict(self), indent=1).encode())

    @classmethod
    def load(cls, path: Path) -> Part:
        raw = json.loads(path.read_text())
        return cls(**dict(raw, chunks=[ChunkEntry(**c) for c in raw["chunks"]]))


def model_id(cfg: CacheConfig) -> str:
    model = cfg.model
    if model.hf_name:
        return model.hf_name
    if model.gguf_package:
        return f"{model.gguf_package}/{model.gguf_file or '*.gguf'}"
    return f"{model.name}(seed={model.seed})"


class CacheJob:
    """One shard of `clt cache` (or, with split="held_out", the small held-out dataset)."""

    def __init__(self, cfg: CacheConfig, out: Path, split: str = "train"):
        self.cfg, self.out = cfg, out
        held_out = split == "held_out"
        self.plan = Plan.from_config(cfg, split, cfg.held_out_tokens if held_out else None, 1 if held_out else None)
        self.index, self.count = (0, 1) if held_out else (cfg.shard.index, cfg.shard.count)
        if not 0 <= self.index < self.count:
            raise CLTError(f"shard.index={self.index} must be in [0, shard.count={self.count}).")
        self.spec = QuantSpec(**self.plan.quant)
        self.stats = RunningStats(cfg.model.n_layers, cfg.model.d_model)
        self.part = Part(plan=dataclasses.asdict(self.plan), index=self.index, chunks=[])
        self.bytes_written = 0
        self._commit_lock = threading.Lock()

    # -- resume ---------------------------------------------------------------------------
    def load_progress(self) -> None:
        self._remove_stale_temporaries()
        if (self.out / MANIFEST).is_file():
            self._check_plan(read_manifest(self.out).plan, self.out / MANIFEST)
            return
        path = part_path(self.out, self.index, self.count)
        if not path.is_file():
            return
        part = Part.load(path)
        self._check_plan(part.plan, path)
        for entry in part.chunks:
            file = self.out / entry.path
            if not file.is_file() or file.stat().st_size != entry.n_bytes:
                raise CLTError(f"{file} is listed in {path} but missing or resized: the dataset folder was altered.")
        self.part = part
        if part.stats_file:
            self.stats = RunningStats.from_bytes((self.out / part.stats_file).read_bytes())

    def _remove_stale_temporaries(self) -> None:
        """A job killed mid-write leaves its temporary file (never a renamed one): drop ours."""
        for pattern in (f"chunks/.s{self.index:05d}-*", f"parts/.shard-{self.index:05d}-*"):
            for stale in self.out.glob(pattern):
                stale.unlink(missing_ok=True)

    def _check_plan(self, recorded: dict[str, Any], where: Path) -> None:
        diffs = self.plan.differences(recorded)
        if diffs:
            raise CLTError(
                f"out={self.out} already holds a cache made with other settings ({where}): "
                + "; ".join(diffs)
                + ". Use another out=, or the same settings to resume."
            )

    # -- run --------------------------------------------------------------------------------
    def run(self, model: Any) -> bool:
        """Cache this shard; returns True when the whole dataset is complete (merged)."""
        self.load_progress()
        if (self.out / MANIFEST).is_file():
            print(f"{self.out / MANIFEST} exists: the dataset is complete, nothing to do.")
            return True
        if self.plan.split == "train" and self.index == 0 and self.cfg.held_out_tokens > 0:
            # before shard 0's part can be complete: the last shard to finish merges, and the
            # held-out set must exist by then
            held_out = CacheJob(self.cfg, self.out / HELD_OUT, split="held_out")
            held_out.load_progress()
            held_out.run(model)
        if not self.part.complete:
            self._cache_chunks(model)
        return merge_if_complete(self.out, self.count)

    def my_windows(self, tokenizer: Any) -> Any:
        windows = token_windows(self.cfg.data, tokenizer, split=self.plan.split)
        mine = itertools.islice(windows, self.index, self.plan.n_windows, self.count)
        return batched(mine, self.plan.windows_per_chunk)

    def _cache_chunks(self, model: Any) -> None:
        done = len(self.part.chunks)
        chunks = self.my_windows(model.tokenizer)
        total_chunks = math.ceil(len(range(self.index, self.plan.n_windows, self.count)) / self.plan.windows_per_chunk)
        raw_bytes_per_token = 2 * self.cfg.model.n_layers * self.cfg.model.d_model * 2  # fp16 in + out
        bar = progress_bar(
            total=total_chunks * self.plan.windows_per_chunk * self.plan.tokens_per_window,
            unit="tok",
            unit_scale=True,
            desc=f"clt cache {self.plan.split} {self.index}/{self.count}",
        )
        pending: Future[None] | None = None
        started = time.perf_counter()
        # On a CPU the forward already uses every core: encoding beside it stalls its threads
        # (measured: 0.76 of the bare forward in the background vs 0.86 inline, 2 cores).
        inline = self.cfg.encode == EncodeMode.inline or (
            self.cfg.encode == EncodeMode.auto and next(model.parameters()).device.type == "cpu"
        )
        # Inline, the two kinds are encoded side by side with half of torch's threads each
        # (no thread team to synchronise per operation, and zstd runs on every core), and only
        # the writing (checksum, file writes, fsyncs: mostly waiting) goes to the writer
        # thread; in the background, encoding too. At most one chunk is in flight either way.
        threads = max(1, torch.get_num_threads() // 2) if inline else None
        # The activations are written into reused buffers (fresh memory costs page faults):
        # inline, a chunk is encoded before the next forward; in the background, chunk n's job
        # has finished before chunk n + 2 is computed, so two pairs take turns.
        size = (
            self.plan.windows_per_chunk * self.plan.tokens_per_window * self.cfg.model.n_layers * self.cfg.model.d_model
        )
        buffers = [(torch.empty(size), torch.empty(size)) for _ in range(1 if inline else 2)]
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="clt-write") as worker,
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="clt-encode") as encoders,  # one per kind
        ):
            for number, windows in enumerate(chunks):
                if number < done:
                    bar.update(len(windows) * self.plan.tokens_per_window)
                    continue  # committed before an interruption
                tokens, mlp_in, mlp_out = self._forward(model, windows, buffers[number % len(buffers)])
                if inline:
                    with torch_threads(threads):
                        encoded = self._encode(number, tokens, mlp_in, mlp_out, encoders)
                    job = functools.partial(self._store, number, *encoded)
                else:
                    job = functools.partial(self._commit, number, tokens, mlp_in, mlp_out, encoders)
                if pending is not None:
                    pending.result()  # bounded memory; errors surface here
                pending = worker.submit(job)
                bar.update(tokens.numel())
                served = sum(c.n_tokens for c in self.part.chunks) + tokens.numel()
                ratio = served * raw_bytes_per_token / max(self.bytes_written, 1)
                bar.set_postfix(written=f"{self.bytes_written / 1e6:.1f}MB", ratio_vs_fp16=f"{ratio:.1f}x")
            if pending is not None:
                pending.result()
        bar.close()
        cached = sum(c.n_tokens for c in self.part.chunks)
        if cached < self.plan.tokens // self.count:
            print(f"note: the {self.plan.split} split ran out of text: this shard cached {cached} tokens.")
        self.part.complete = True
        self.part.save(self.out, self.count)
        elapsed = time.perf_counter() - started
        print(
            f"{self.plan.split} shard {self.index}/{self.count}: {len(self.part.chunks)} chunks, {self.bytes_written / 1e6:.1f} MB in {elapsed:.0f} s"
        )

    def _forward(
        self, model: Any, windows: list[torch.Tensor], buffers: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids and activations of a chunk's windows, BOS positions dropped."""
        hooks = (self.plan.hook_in, self.plan.hook_out)
        return window_activations(
            model, torch.stack(windows), self.plan.prepend_bos, self.cfg.batch_size, buffers, hooks=hooks
        )

    def _commit(
        self, number: int, tokens: torch.Tensor, mlp_in: torch.Tensor, mlp_out: torch.Tensor, pool: Executor
    ) -> None:
        self._store(number, *self._encode(number, tokens, mlp_in, mlp_out, pool))

    def _encode(
        self, number: int, tokens: torch.Tensor, mlp_in: torch.Tensor, mlp_out: torch.Tensor, pool: Executor
    ) -> tuple[int, bytes, bytes]:
        """The chunk file's bytes (the two kinds encoded side by side in `pool`), and the shard's
        running statistics including this chunk (gathered by the encoder as it reads each layer)."""
        observers = {kind: self.stats.observer(kind) for kind in KINDS}
        try:
            data = encode_chunk(tokens, mlp_in, mlp_out, self.spec, observers, pool)
        except CLTError as err:
            raise CLTError(
                f"{self.out}: chunk {number} of shard {self.index}: {err}. Chunks written before it are kept."
            ) from None
        self.stats.count += tokens.numel()
        return tokens.numel(), data, self.stats.to_bytes()

    def _store(self, number: int, n_tokens: int, data: bytes, stats: bytes) -> None:
        """Write chunk `number` and the statistics up to it, then record both in the part file.

        The statistics file is named after the chunk, so the part file always names the one
        that matches its chunk list: a job killed between the two writes resumes with the
        statistics of the chunks it lists, and redoes the chunk without counting it twice."""
        relative = f"chunks/s{self.index:05d}-c{number:06d}.clt"
        atomic_write(self.out / relative, data)
        stats_file = f"parts/shard-{self.index:05d}-of-{self.count:05d}.c{number:06d}.stats.safetensors"
        atomic_write(self.out / stats_file, stats)
        with self._commit_lock:
            previous = self.part.stats_file
            self.part.chunks.append(ChunkEntry(relative, n_tokens, len(data), checksum(data)))
            self.part.stats_file = stats_file
            self.part.save(self.out, self.count)
            self.bytes_written += len(data)
        if previous and previous != stats_file:
            (self.out / previous).unlink(missing_ok=True)


def batched(items: Any, size: int) -> Any:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def merge_if_complete(out: Path, count: int) -> bool:
    """Merge every shard's part into manifest.json once all are complete. Idempotent."""
    if (out / MANIFEST).is_file():
        return True
    if (out / HELD_OUT / "parts").is_dir() and not (out / HELD_OUT / MANIFEST).is_file():
        return False  # shard 0 is still caching the held-out documents
    parts = []
    for index in range(count):
        path = part_path(out, index, count)
        if not path.is_file():
            return False
        part = Part.load(path)
        if not part.complete:
            return False
        parts.append(part)
    plans = {json.dumps(p.plan, sort_keys=True) for p in parts}
    if len(plans) != 1:
        raise CLTError(f"the shards in {out / 'parts'} were made with different settings; they cannot be merged.")
    plan = parts[0].plan
    stats: RunningStats | None = None
    for part in parts:
        if part.stats_file:
            shard_stats = RunningStats.from_bytes((out / part.stats_file).read_bytes())
            if stats is None:
                stats = shard_stats
            else:
                stats.merge(shard_stats)
    if stats is None:
        raise CLTError(f"the shards in {out / 'parts'} hold no tokens: raise tokens=.")
    from safetensors.torch import save

    atomic_write(out / STATS, save(stats.means()))
    chunks = [entry for part in parts for entry in part.chunks]
    data = plan["data"]
    manifest = Manifest(
        model=plan["model"],
        model_id=plan["model_id"],
        hooks=hook_names(stats.n_layers, plan.get("hook_in"), plan.get("hook_out")),
        n_layers=stats.n_layers,
        d_model=stats.d_model,
        quant=plan["quant"],
        chunk_tokens=plan["windows_per_chunk"] * tokens_in_window(plan["context_size"], plan["prepend_bos"]),
        context_size=plan["context_size"],
        prepend_bos=plan["prepend_bos"],
        data=data,
        split=plan["split"],
        n_tokens=sum(entry.n_tokens for entry in chunks),
        shard_count=count,
        chunks=chunks,
        stats={"file": STATS, **stats.summary()},
        plan=plan,
    )
    atomic_write(out / MANIFEST, manifest.to_json().encode())
    return True
