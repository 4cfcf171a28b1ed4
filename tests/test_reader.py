"""The activation reader's plan: even DDP epochs, exact resume in any epoch and after a skipped
corrupt chunk (down to a resumed training run), on synthetic datasets whose token ids number
every stored token, so a batch says exactly which tokens (and chunks) it holds."""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from itertools import combinations
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from clt_forge.artifacts.activations import (
    MANIFEST,
    ChunkEntry,
    Manifest,
    atomic_write,
    checksum,
    encode_chunk,
    read_manifest,
)
from clt_forge.artifacts.quant import QuantSpec
from clt_forge.artifacts.reader import ActivationBatch, ActivationReader
from clt_forge.cache.writer import CacheJob
from clt_forge.config.compose import compose_stage
from clt_forge.errors import CLTError

UNEVEN = [120, 95, 110, 100, 130, 90, 105, 115, 100, 37]  # 10 chunks, a short last one: 1002 tokens


def synthetic(folder: Path, sizes: list[int]) -> Path:
    """A dataset whose token ids (and mlp_in values) are 0, 1, 2, ... across chunks in order."""
    spec = QuantSpec(scheme="none", dtype="float32")
    entries, start = [], 0
    for index, size in enumerate(sizes):
        ids = torch.arange(start, start + size)
        values = ids.to(torch.float32).reshape(size, 1, 1)
        data = encode_chunk(ids, values, -values, spec)
        path = f"chunks/s00000-c{index:06d}.clt"
        atomic_write(folder / path, data)
        entries.append(ChunkEntry(path, size, len(data), checksum(data)))
        start += size
    manifest = Manifest(
        model="synthetic",
        model_id="synthetic",
        hooks={"mlp_in": ["in"], "mlp_out": ["out"]},
        n_layers=1,
        d_model=1,
        quant=dataclasses.asdict(spec),
        chunk_tokens=max(sizes),
        context_size=2,
        prepend_bos=False,
        data={},
        split="train",
        n_tokens=start,
        shard_count=1,
        chunks=entries,
    )
    atomic_write(folder / MANIFEST, manifest.to_json().encode())
    return folder


def chunk_of(sizes: list[int]) -> torch.Tensor:
    """chunk index of every token id"""
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def collect(reader: ActivationReader, n: int) -> list[ActivationBatch]:
    iterator = iter(reader)
    return [next(iterator) for _ in range(n)]


def corrupt(folder: Path, entry: ChunkEntry) -> None:
    data = bytearray((folder / entry.path).read_bytes())
    data[-5] ^= 0xFF
    (folder / entry.path).write_bytes(bytes(data))


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    return synthetic(tmp_path_factory.mktemp("uneven"), UNEVEN)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_epoch_reads_every_token_once_across_ranks_in_equal_steps(uneven, world):
    batch = 20
    readers = [ActivationReader(uneven, batch, seed=7, rank=r, world_size=world) for r in range(world)]
    epochs = 4
    lengths = [[reader.epoch_tokens(e) for e in range(epochs)] for reader in readers]
    assert all(mine == lengths[0] for mine in lengths)  # every rank serves the same tokens in an epoch...
    assert all(length % batch == 0 and length > 0 for length in lengths[0])  # ...in the same whole steps
    steps = [length // batch for length in lengths[0]]
    streams = [collect(reader, sum(steps)) for reader in readers]
    total, largest = sum(UNEVEN), max(UNEVEN)
    first = 0
    for epoch, count in enumerate(steps):
        ids = torch.cat([b.tokens for stream in streams for b in stream[first : first + count]])
        assert ids.unique().numel() == ids.numel(), f"epoch {epoch}: a token read twice"
        assert ids.numel() == world * lengths[0][epoch]
        assert 0 <= total - ids.numel() < world * (largest + batch)  # the documented remainder, dropped
        first += count
    served = torch.cat([b.tokens for stream in streams for b in stream])
    assert served.unique().numel() > total - world * (largest + batch)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_ranks_never_read_the_same_chunk_in_one_step(uneven, world):
    batch, steps = 25, 200  # about 10 epochs
    owner = chunk_of(UNEVEN)
    streams = [collect(ActivationReader(uneven, batch, seed=1, rank=r, world_size=world), steps) for r in range(world)]
    reads = torch.zeros(len(UNEVEN))
    for step in range(steps):
        chunks = [set(owner[stream[step].tokens].tolist()) for stream in streams]
        for a, b in combinations(range(world), 2):
            assert not chunks[a] & chunks[b], f"step {step}: ranks {a} and {b} both read chunks {chunks[a] & chunks[b]}"
        for stream in streams:
            reads += torch.bincount(owner[stream[step].tokens], minlength=len(UNEVEN))
    per_token = reads / torch.tensor(UNEVEN)
    assert per_token.max() - per_token.min() < 3  # no rank re-reads its own chunks ahead of the others


def test_feature_sharded_ranks_passing_one_rank_see_the_same_batches(uneven):
    a = collect(ActivationReader(uneven, 30, seed=2, rank=1, world_size=3), 20)
    b = collect(ActivationReader(uneven, 30, seed=2, rank=1, world_size=3), 20)
    assert all(torch.equal(x.tokens, y.tokens) and torch.equal(x.mlp_in, y.mlp_in) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("world", [1, 3])
def test_resume_in_a_later_epoch_is_exact(uneven, world):
    batch = 30
    rank = world - 1
    straight = collect(ActivationReader(uneven, batch, seed=4, rank=rank, world_size=world), 100)
    assert batch * 77 > 2 * sum(UNEVEN) / world  # k=77 and k=99 resume in the third epoch or later
    for k in (1, 41, 77, 99):
        resumed = ActivationReader(uneven, batch, seed=4, rank=rank, world_size=world, start_tokens=batch * k)
        again = collect(resumed, 100 - k)
        assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(straight[k:], again, strict=True)), f"k={k}"
        assert resumed.tokens_served == batch * 100


def test_world_one_serves_the_whole_dataset_every_epoch(uneven):
    reader = ActivationReader(uneven, 40, seed=0, shuffle_chunks=3)
    ids = torch.cat([b.tokens for b in collect(reader, 50)])  # 2000 tokens: nearly two epochs
    assert torch.equal(ids[: sum(UNEVEN)].sort().values, torch.arange(sum(UNEVEN)))


@pytest.mark.parametrize(("world", "shuffle_chunks"), [(1, 4), (2, 3), (1, 1)])
def test_resume_after_a_skipped_corrupt_chunk_is_exact(uneven, tmp_path, world, shuffle_chunks):
    folder = tmp_path / "ds"
    shutil.copytree(uneven, folder)
    kwargs = dict(seed=3, rank=0, world_size=world, shuffle_chunks=shuffle_chunks, skip_corrupt=True)
    victim = ActivationReader(folder, 10, **kwargs).groups(0)[0][0]  # read in the very first group
    corrupt(folder, victim)
    owner, victim_index = chunk_of(UNEVEN), read_manifest(folder).chunks.index(victim)
    batch, n = 20, 60
    with pytest.warns(UserWarning, match="skipping"):
        straight = collect(ActivationReader(folder, batch, **kwargs), n)
    ids = torch.cat([b.tokens for b in straight])
    assert not (owner[ids] == victim_index).any()  # none of the corrupt chunk's tokens is served
    # a pure function of (seed, readable chunks); resumed anywhere (in the group, after it, a
    # later epoch) the reader skips the same chunk the same way
    for k in (0, 1, 3, 7, 20, 45):
        with warnings.catch_warnings():  # whether this reader meets the chunk depends on k
            warnings.simplefilter("ignore", UserWarning)
            resumed = collect(ActivationReader(folder, batch, start_tokens=batch * k, **kwargs), n - k)
        assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(straight[k:], resumed, strict=True)), f"k={k}"


def test_unreadable_dataset_and_too_small_epochs_are_refused(uneven, tmp_path):
    folder = tmp_path / "ds"
    shutil.copytree(uneven, folder)
    for entry in read_manifest(folder).chunks:
        corrupt(folder, entry)
    with pytest.warns(UserWarning), pytest.raises(CLTError, match=r"none of the 10 chunks.*readable"):
        collect(ActivationReader(folder, 10, skip_corrupt=True), 1)
    with pytest.raises(CLTError, match="fewer than one batch of 400 for each of 3 ranks"):
        ActivationReader(uneven, 400, world_size=3)


# -- a training run that skips a corrupt chunk resumes to the same weights ------------------------

TRAIN = ["model=tiny", "data.context_size=32", "clt.d_features=96", "batch_size=128", "eval_every=10", "log_every=1"]


def test_training_with_a_skipped_chunk_resumes_to_the_same_weights(tiny_model, tmp_path):
    from clt_forge.training import CLTTrainingRunner, load_checkpoint

    acts = tmp_path / "acts"
    overrides = ["model=tiny", "data.context_size=32", "tokens=3000", "chunk_tokens=310", "held_out_tokens=310"]
    CacheJob(OmegaConf.to_object(compose_stage("cache", [*overrides, f"out={acts}"])), acts).run(tiny_model)

    def config(out: Path, *extra: str):
        common = [*TRAIN, f"activations={acts}", "tokens=3840", "checkpoint_every=10", "reader.skip_corrupt=true"]
        return OmegaConf.to_object(compose_stage("train", [*common, f"out={out}", *extra]))

    seed = config(tmp_path / "probe").seed
    victim = ActivationReader(acts, 128, seed=seed).groups(0)[0][0]  # consumed before the step-10 checkpoint
    corrupt(acts, victim)
    with pytest.warns(UserWarning, match="skipping"):
        whole = CLTTrainingRunner(config(tmp_path / "whole")).run()
    # interrupted just after the step-10 checkpoint: its later checkpoints never written
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for later in [cut / "checkpoints" / "final", *(cut / "checkpoints").glob("step-*")]:
        if later.name != "step-00000010":
            shutil.rmtree(later)
    with pytest.warns(UserWarning, match="skipping"):
        CLTTrainingRunner(config(tmp_path / "ignored", f"resume={cut}")).run()
    final_whole, _, info = load_checkpoint(whole / "checkpoints" / "final")
    final_cut, _, _ = load_checkpoint(cut / "checkpoints" / "final")
    assert info.step == 30
    for (name, a), (_, b) in zip(final_whole.state_dict().items(), final_cut.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_skip_corrupt_also_covers_the_evaluation_batch_of_a_dataset_without_held_out(tiny_model, tmp_path):
    from clt_forge.training import CLTTrainingRunner

    acts = tmp_path / "acts"
    overrides = ["model=tiny", "data.context_size=32", "tokens=1500", "chunk_tokens=310", "held_out_tokens=0"]
    CacheJob(OmegaConf.to_object(compose_stage("cache", [*overrides, f"out={acts}"])), acts).run(tiny_model)
    assert not (acts / "held_out").exists()
    corrupt(acts, read_manifest(acts).chunks[2])
    extra = [f"activations={acts}", "tokens=256", "eval_tokens=1400", "reader.skip_corrupt=true"]
    cfg = OmegaConf.to_object(compose_stage("train", [*TRAIN, *extra, f"out={tmp_path / 'run'}"]))
    with pytest.warns(UserWarning, match="skipping"):  # the evaluation batch spans every chunk
        assert (CLTTrainingRunner(cfg).run() / "checkpoints" / "final").is_dir()
