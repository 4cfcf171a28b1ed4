"""Read an activation dataset back as shuffled batches, faster than training consumes them.

Order: in epoch e, the chunks are permuted with a generator seeded by (seed, e); a data rank
r of `world_size` takes every world_size-th chunk of that order (DDP ranks read disjoint
chunks; feature-sharded ranks pass the same rank and see the same batches). Its chunks are
taken `shuffle_chunks` at a time; the tokens of such a group are shuffled together (seeded by
seed, epoch, group, rank) and cut into batches, a batch spanning groups (and epochs) when
needed. The stream wraps around forever, so it is a pure function of the seed: the reader's
whole position is `tokens_served`, and `start_tokens=` resumes exactly there, skipping the
groups before it without decoding them. Background threads read, verify and decode groups
ahead of the consumer.
"""

from __future__ import annotations

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

    # -- the deterministic plan -----------------------------------------------------------
    def groups(self, epoch: int) -> list[list[ChunkEntry]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.manifest.chunks))
        mine = [self.manifest.chunks[i] for i in order[self.rank :: self.world_size]]
        return [mine[i : i + self.shuffle_chunks] for i in range(0, len(mine), self.shuffle_chunks)]

    def _plan(self) -> Iterator[tuple[int, int, list[ChunkEntry], int]]:
        """(epoch, group, chunks, tokens to skip in it) from start_tokens on, forever."""
        skip = self.start_tokens
        epoch = 0
        while True:
            for number, group in enumerate(self.groups(epoch)):
                size = sum(entry.n_tokens for entry in group)
                if skip >= size:
                    skip -= size
                    continue
                yield epoch, number, group, skip
                skip = 0
            epoch += 1

    def _load_group(self, pool: ThreadPoolExecutor, epoch: int, number: int, group: list[ChunkEntry]) -> Chunk | None:
        chunks = [c for c in pool.map(self._read, group) if c is not None]
        if not chunks:
            return None
        perm = torch.from_numpy(
            np.random.default_rng([self.seed, epoch, number, self.rank]).permutation(
                sum(c.tokens.numel() for c in chunks)
            )
        )
        return Chunk(
            torch.cat([c.tokens for c in chunks])[perm],
            torch.cat([c.mlp_in for c in chunks])[perm],
            torch.cat([c.mlp_out for c in chunks])[perm],
        )

    def _read(self, entry: ChunkEntry) -> Chunk | None:
        try:
            return read_chunk(self.folder, entry, self.spec)
        except CLTError as err:
            if not self.skip_corrupt:
                raise
            warnings.warn(f"skipping: {err}", stacklevel=2)
            return None

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[ActivationBatch]:
        ready: queue.Queue[tuple[Chunk | None, int] | BaseException] = queue.Queue(maxsize=self.prefetch_groups)
        stop = threading.Event()

        def produce() -> None:
            with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="clt-read") as pool:
                try:
                    for epoch, number, group, skip in self._plan():
                        if stop.is_set():
                            return
                        ready.put((self._load_group(pool, epoch, number, group), skip))
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
                group, skip = item
                if group is None:
                    continue
                pieces.append(Chunk(group.tokens[skip:], group.mlp_in[skip:], group.mlp_out[skip:]))
                have += group.tokens.numel() - skip
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
