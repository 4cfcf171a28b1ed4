"""Read an activation dataset back as shuffled batches, faster than training consumes them.

The stream of a data rank is a pure function of (seed, rank, world_size, batch_size, the
manifest, the set of readable chunks): the reader's whole position is `tokens_served`, and
`start_tokens=` resumes exactly there, in any epoch, skipping the groups before it without
decoding them. Background threads read, verify and decode groups ahead of the consumer.

Epoch e, in four steps:

1. the chunks are permuted with a generator seeded by (seed, e);
2. DDP ranks split them: walking that order, each chunk goes to the data rank holding the fewest
   tokens so far (ties to the lower rank), so ranks read disjoint chunks and their token counts
   differ by at most one chunk (equal chunks give plain round robin, `order[rank::world_size]`);
   feature-sharded ranks pass the same rank and see the same batches;
3. a rank's chunks are taken `shuffle_chunks` at a time; the tokens of such a group are shuffled
   together (seeded by seed, e, group, rank);
4. every rank serves the same number of tokens in the epoch (`epoch_tokens(e)`): with one data
   rank the whole dataset, a batch spanning two epochs when needed; with several, the fewest
   tokens any rank holds, rounded down to a multiple of the batch size, so all ranks take the
   same number of steps and no batch spans two epochs (where two ranks could meet one chunk).

The remainder, dropped: a rank's shuffled tokens past `epoch_tokens(e)`, fewer than
world_size x (largest chunk + batch_size) tokens per epoch in all, none at one data rank. It is
a different seeded subset each epoch. Within an epoch every other token is read exactly once
across ranks, and no two ranks read the same chunk in the same step.

`skip_corrupt=True`: a chunk failing its size or checksum is skipped with a warning, and its
place in the stream is taken by extra draws from the other chunks of its group (the group's
shuffle permutation of its planned size, taken modulo the tokens that did read); when no chunk
of the group reads, from the nearest group of the rank's epoch that does. The plan (positions,
epoch lengths, steps per rank) never depends on which chunks read, so ranks need not agree on
it, and a resumed reader meets the same chunk at the same position and fills it the same way.
"""

from __future__ import annotations

import heapq
import queue
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clt_forge.artifacts.activations import Chunk, ChunkEntry, Manifest, read_chunk, read_manifest
from clt_forge.errors import CLTError


@dataclass
class ActivationBatch:
    mlp_in: torch.Tensor  # float32 [batch, n_layers, d_model]
    mlp_out: torch.Tensor  # float32 [batch, n_layers, d_model]
    tokens: torch.Tensor  # int64 [batch]


@dataclass
class _Serve:
    """One step of the plan: serve tokens [start, stop) of group `number` of this rank's epoch."""

    epoch: int
    number: int
    groups: list[list[ChunkEntry]]
    start: int
    stop: int


def check_compatible(manifest: Manifest, source: Path, *, model: str, n_layers: int, d_model: int) -> None:
    """Refuse a dataset made from another model than the run asks for, naming both."""
    mismatches = [
        f"{name}: dataset {ours!r}, config {theirs!r}"
        for name, ours, theirs in (
            ("model", manifest.model, model),
            ("n_layers", manifest.n_layers, n_layers),
            ("d_model", manifest.d_model, d_model),
        )
        if ours != theirs
    ]
    if mismatches:
        raise CLTError(f"activation dataset {source} does not match the configured model ({'; '.join(mismatches)}).")


class ActivationReader:
    def __init__(
        self,
        path: str | Path,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_chunks: int = 4,
        prefetch_groups: int = 2,
        workers: int = 2,
        start_tokens: int = 0,
        skip_corrupt: bool = False,
    ):
        self.folder = Path(path)
        self.manifest = read_manifest(self.folder)
        self.spec = self.manifest.quant_spec
        if batch_size < 1:
            raise CLTError(f"batch_size={batch_size}: must be positive.")
        if not 0 <= rank < world_size:
            raise CLTError(f"data rank {rank} must be in [0, world_size={world_size}).")
        if len(self.manifest.chunks) < world_size:
            raise CLTError(
                f"{self.folder} has {len(self.manifest.chunks)} chunks, fewer than the {world_size} data ranks."
            )
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle_chunks, self.prefetch_groups, self.workers = (
            max(1, shuffle_chunks),
            max(1, prefetch_groups),
            workers,
        )
        self.start_tokens = start_tokens
        self.tokens_served = start_tokens
        self.skip_corrupt = skip_corrupt
        self.epoch_tokens(0)  # a dataset too small for its ranks and batch fails here, not mid-run

    # -- the deterministic plan -----------------------------------------------------------
    def assignment(self, epoch: int) -> list[list[ChunkEntry]]:
        """The chunks of every data rank in `epoch`, in reading order (disjoint, balanced by tokens)."""
        chunks = self.manifest.chunks
        order = np.random.default_rng([self.seed, epoch]).permutation(len(chunks))
        ranks: list[list[ChunkEntry]] = [[] for _ in range(self.world_size)]
        load = [(0, r) for r in range(self.world_size)]  # a heap of (tokens so far, rank)
        for i in order:
            tokens, r = heapq.heappop(load)
            ranks[r].append(chunks[i])
            heapq.heappush(load, (tokens + chunks[i].n_tokens, r))
        return ranks

    def epoch_tokens(self, epoch: int) -> int:
        """Tokens every data rank serves in `epoch` (the same number on each)."""
        if self.world_size == 1:
            return self.manifest.n_tokens
        fewest = min(sum(entry.n_tokens for entry in chunks) for chunks in self.assignment(epoch))
        if fewest < self.batch_size:
            raise CLTError(
                f"{self.folder}: in epoch {epoch} a data rank holds {fewest} tokens, fewer than one batch of "
                f"{self.batch_size} for each of {self.world_size} ranks; use a smaller batch, fewer ranks or more data."
            )
        return fewest // self.batch_size * self.batch_size

    def groups(self, epoch: int) -> list[list[ChunkEntry]]:
        """This rank's shuffle groups in `epoch` (the last may reach past `epoch_tokens`)."""
        mine = self.assignment(epoch)[self.rank]
        return [mine[i : i + self.shuffle_chunks] for i in range(0, len(mine), self.shuffle_chunks)]

    def _plan(self) -> Iterator[_Serve]:
        """The groups to load and the token range of each to serve, from start_tokens on, forever."""
        epoch, skip = 0, self.start_tokens
        while skip >= (length := self.epoch_tokens(epoch)):
            skip, epoch = skip - length, epoch + 1
        while True:
            groups, offset = self.groups(epoch), 0
            for number, group in enumerate(groups):
                stop = min(sum(entry.n_tokens for entry in group), length - offset)
                if stop <= 0:
                    break
                if skip < offset + stop:
                    yield _Serve(epoch, number, groups, max(0, skip - offset), stop)
                offset += stop
            epoch, skip = epoch + 1, 0
            length = self.epoch_tokens(epoch)

    # -- reading ----------------------------------------------------------------------------
    def _load_group(self, pool: ThreadPoolExecutor, step: _Serve) -> Chunk:
        """The group's shuffled tokens, its planned size whatever failed to read."""
        group = step.groups[step.number]
        chunks = self._readable(pool, group) or self._fill_source(pool, step)
        have = sum(c.tokens.numel() for c in chunks)
        planned = sum(entry.n_tokens for entry in group)
        # with every chunk read, `% have` changes nothing; otherwise it repeats readable tokens
        rng = np.random.default_rng([self.seed, step.epoch, step.number, self.rank])
        perm = torch.from_numpy(rng.permutation(planned) % have)
        return Chunk(
            torch.cat([c.tokens for c in chunks])[perm],
            torch.cat([c.mlp_in for c in chunks])[perm],
            torch.cat([c.mlp_out for c in chunks])[perm],
        )

    def _readable(self, pool: ThreadPoolExecutor, group: list[ChunkEntry]) -> list[Chunk]:
        return [c for c in pool.map(self._read, group) if c is not None]

    def _fill_source(self, pool: ThreadPoolExecutor, step: _Serve) -> list[Chunk]:
        """No chunk of the group read: the readable chunks of the nearest group of this epoch."""
        n = len(step.groups)
        for distance in range(1, n):
            for other in (step.number - distance, step.number + distance):
                if 0 <= other < n and (chunks := self._readable(pool, step.groups[other])):
                    return chunks
        raise CLTError(
            f"{self.folder}: none of the {sum(len(g) for g in step.groups)} chunks data rank {self.rank} reads in "
            f"epoch {step.epoch} is readable; see the warnings above for each file."
        )

    def _read(self, entry: ChunkEntry) -> Chunk | None:
        try:
            return read_chunk(self.folder, entry, self.spec)
        except CLTError as err:
            if not self.skip_corrupt:
                raise
            warnings.warn(f"skipping: {err} Tokens read with it take its place in the stream.", stacklevel=2)
            return None

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[ActivationBatch]:
        ready: queue.Queue[Chunk | BaseException] = queue.Queue(maxsize=self.prefetch_groups)
        stop = threading.Event()

        def produce() -> None:
            with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="clt-read") as pool:
                try:
                    for step in self._plan():
                        if stop.is_set():
                            return
                        group = self._load_group(pool, step)
                        ready.put(
                            Chunk(
                                group.tokens[step.start : step.stop],
                                group.mlp_in[step.start : step.stop],
                                group.mlp_out[step.start : step.stop],
                            )
                        )
                except BaseException as err:  # handed to the consumer, raised there
                    ready.put(err)

        producer = threading.Thread(target=produce, name="clt-prefetch", daemon=True)
        producer.start()
        pieces: list[Chunk] = []
        have = 0
        try:
            while True:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                pieces.append(item)
                have += item.tokens.numel()
                while have >= self.batch_size:
                    batch, pieces = _take(pieces, self.batch_size)
                    have -= self.batch_size
                    self.tokens_served += self.batch_size
                    yield batch
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    producer.join(timeout=0.05)


def _take(pieces: list[Chunk], n: int) -> tuple[ActivationBatch, list[Chunk]]:
    taken: list[Chunk] = []
    need = n
    while need:
        head = pieces[0]
        size = head.tokens.numel()
        if size <= need:
            taken.append(head)
            pieces = pieces[1:]
            need -= size
        else:
            taken.append(Chunk(head.tokens[:need], head.mlp_in[:need], head.mlp_out[:need]))
            pieces = [Chunk(head.tokens[need:], head.mlp_in[need:], head.mlp_out[need:]), *pieces[1:]]
            need = 0
    if len(taken) == 1:
        only = taken[0]
        return ActivationBatch(only.mlp_in, only.mlp_out, only.tokens), pieces
    return (
        ActivationBatch(
            torch.cat([t.mlp_in for t in taken]),
            torch.cat([t.mlp_out for t in taken]),
            torch.cat([t.tokens for t in taken]),
        ),
        pieces,
    )
