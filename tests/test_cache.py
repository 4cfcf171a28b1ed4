"""`clt cache` and the reader, on the tiny model: format, shards, resume, shuffling, errors."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from clt_forge.artifacts.activations import FORMAT_VERSION, MANIFEST, STATS, encode_chunk, read_chunk, read_manifest
from clt_forge.artifacts.normalization import Normalization
from clt_forge.artifacts.reader import ActivationReader, check_compatible
from clt_forge.artifacts.stats import RunningStats, load_stats
from clt_forge.cache import writer
from clt_forge.cache.writer import CacheJob, Part, Plan, merge_if_complete
from clt_forge.config.compose import compose_stage
from clt_forge.data import token_windows
from clt_forge.data.store import ActivationsStore
from clt_forge.errors import CLTError
from clt_forge.models import mlp_activations

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "model=tiny",
    "data.context_size=16",
    "tokens=1500",
    "chunk_tokens=150",
    "batch_size=4",
    "data.max_documents=60",
]


def cache_config(out: Path, *overrides: str):
    return OmegaConf.to_object(compose_stage("cache", [*SMALL, f"out={out}", *overrides]))


def write(tiny_model, out: Path, *overrides: str) -> bool:
    job = CacheJob(cache_config(out, *overrides), out)
    return job.run(tiny_model)


def all_chunks(folder: Path):
    manifest = read_manifest(folder)
    return [read_chunk(folder, entry, manifest.quant_spec) for entry in manifest.chunks]


def test_dataset_holds_the_windows_and_their_exact_activations(tiny_model, tmp_path):
    out = tmp_path / "ds"
    assert write(tiny_model, out, "quant=none")
    manifest = read_manifest(out)
    assert manifest.n_tokens == 1500 and manifest.n_layers == 3 and manifest.d_model == 64
    assert manifest.hooks["mlp_in"][2] == "blocks.2.mlp.hook_in"
    assert manifest.quant["scheme"] == "none"  # BOS is never stored (no manifest flag): checked on the tokens below
    assert sum(c.n_tokens for c in manifest.chunks) == 1500
    cfg = cache_config(out, "quant=none")
    windows = torch.stack(list(token_windows(cfg.data, tiny_model.tokenizer))[:100])
    mlp_in, mlp_out = mlp_activations(tiny_model, windows)
    chunks = all_chunks(out)
    tokens = torch.cat([c.tokens for c in chunks])
    assert torch.equal(tokens, windows[:, 1:].flatten())  # BOS dropped, window order kept
    assert tiny_model.tokenizer.bos_token_id not in tokens.tolist()
    torch.testing.assert_close(torch.cat([c.mlp_in for c in chunks]), mlp_in[:, 1:].flatten(0, 1))
    torch.testing.assert_close(torch.cat([c.mlp_out for c in chunks]), mlp_out[:, 1:].flatten(0, 1))
    stats = manifest.stats
    expected_std = mlp_out[:, 1:].flatten(0, 1).std(0, unbiased=False).square().mean(1).sqrt()
    torch.testing.assert_close(torch.tensor(stats["mlp_out"]["std"]), expected_std, rtol=1e-4, atol=1e-6)


def test_int8_dataset_is_smaller_and_close(tiny_model, tmp_path):
    write(tiny_model, tmp_path / "fp32", "quant=none")
    write(tiny_model, tmp_path / "int8", "quant=int8")
    exact, quantized = all_chunks(tmp_path / "fp32"), all_chunks(tmp_path / "int8")
    for kind in ("mlp_in", "mlp_out"):
        x = torch.cat([getattr(c, kind) for c in exact])
        y = torch.cat([getattr(c, kind) for c in quantized])
        assert ((x - y).square().sum() / x.square().sum()).item() < 1e-3
    size = lambda folder: sum(c.n_bytes for c in read_manifest(folder).chunks)  # noqa: E731
    assert size(tmp_path / "int8") < size(tmp_path / "fp32") / 3


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_statistics_are_those_of_the_exact_activations(tiny_model, tmp_path, quant):
    """The encoder gathers them layer by layer as it reads (int8: before outliers are set aside)."""
    out = tmp_path / quant
    write(tiny_model, out, f"quant={quant}")
    manifest = read_manifest(out)
    windows = torch.stack(list(token_windows(cache_config(out).data, tiny_model.tokenizer))[:100])
    exact = dict(zip(("mlp_in", "mlp_out"), mlp_activations(tiny_model, windows), strict=True))
    means = load_stats(out / STATS)
    for kind, x in exact.items():
        x = x[:, 1:].flatten(0, 1).double()  # BOS is not stored
        close = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-6, check_dtype=False)
        close(means[f"{kind}.mean"], x.mean(0).float())
        close(means[f"{kind}.mean_sq"], x.square().mean(0).float())
        stats = manifest.stats[kind]
        close(torch.tensor(stats["std"]), x.var(0, unbiased=False).mean(1).sqrt())
        close(torch.tensor(stats["mean_sq_norm"]), x.square().sum(2).mean(0))
        close(torch.tensor(stats["mean_norm"]), x.norm(dim=2).mean(0))
        assert stats["max_abs"] == x.abs().amax(dim=(0, 2)).float().tolist()


@pytest.mark.parametrize("method", ["mean_norm", "rms", "mixed"])
def test_normalisation_from_the_manifest_equals_one_estimated_from_every_token(tiny_model, tmp_path, method):
    """mean_norm makes the mean token norm sqrt(d_model); rms the mean squared norm d_model."""
    out = tmp_path / "ds"
    write(tiny_model, out, "quant=none")
    manifest = read_manifest(out)
    from_stats = Normalization.from_manifest(manifest, method)
    batches = [next(iter(ActivationsStore.from_cache(out, manifest.n_tokens, seed=0)))]  # every token
    estimated = Normalization.estimate(batches, method)
    torch.testing.assert_close(from_stats.in_scale, estimated.in_scale, rtol=1e-4, atol=0)
    torch.testing.assert_close(from_stats.out_scale, estimated.out_scale, rtol=1e-4, atol=0)
    d = manifest.d_model
    normalised = {
        "mean_norm": [from_stats.inputs(batches[0].mlp_in.float()), from_stats.outputs(batches[0].mlp_out.float())],
        "rms": [],
    }
    if method == "rms":
        normalised = {"mean_norm": [], "rms": normalised["mean_norm"]}
    elif method == "mixed":  # inputs by mean norm, outputs by rms
        normalised = {"mean_norm": normalised["mean_norm"][:1], "rms": normalised["mean_norm"][1:]}
    for kind_method, tensors in normalised.items():
        for v in tensors:
            measured = v.norm(dim=-1).mean(0) if kind_method == "mean_norm" else v.square().sum(-1).mean(0)
            expected = d**0.5 if kind_method == "mean_norm" else d
            torch.testing.assert_close(measured, torch.full_like(measured, expected), rtol=1e-3, atol=0)


def test_a_dataset_without_mean_norms_says_so_and_still_gives_rms(tiny_model, tmp_path):
    out = tmp_path / "ds"
    write(tiny_model, out, "quant=none")
    manifest = read_manifest(out)
    for kind in ("mlp_in", "mlp_out"):
        del manifest.stats[kind]["mean_norm"]  # as cached before mean norms were kept
    with pytest.raises(CLTError, match="no mean token norm"):
        Normalization.from_manifest(manifest, "mean_norm")
    assert Normalization.from_manifest(manifest, "rms").in_scale.shape == (manifest.n_layers,)
    with pytest.raises(CLTError, match="normalization='l2'"):
        Normalization.from_manifest(manifest, "l2")
    old, new = RunningStats(2, 3, norms=None), RunningStats(2, 3)
    new.merge(old)  # a shard without norms makes the merged sum unknowable: none is written
    assert new.norms is None and "mean_norm" not in new.summary()["mlp_in"]
    assert RunningStats.from_bytes(old.to_bytes()).norms is None


def test_background_encoding_writes_the_same_bytes_as_inline(tiny_model, tmp_path, monkeypatch):
    """encode=background (the GPU default) encodes chunk n while chunk n + 1 is computed into
    the other of two reused buffer pairs: a chunk overwritten before it was encoded would differ
    (a slow encoder makes sure the next forward runs first)."""
    write(tiny_model, tmp_path / "inline", "quant=int8", "encode=inline")

    def slow_encode_chunk(*args, **kwargs):
        time.sleep(0.1)
        return encode_chunk(*args, **kwargs)

    monkeypatch.setattr(writer, "encode_chunk", slow_encode_chunk)
    write(tiny_model, tmp_path / "background", "quant=int8", "encode=background")
    inline, background = read_manifest(tmp_path / "inline"), read_manifest(tmp_path / "background")
    assert len(inline.chunks) == 10
    assert [c.checksum for c in inline.chunks] == [c.checksum for c in background.chunks]
    assert inline.stats == background.stats


def test_two_shards_merge_into_the_single_job_dataset(tiny_model, tmp_path):
    write(tiny_model, tmp_path / "one", "quant=none")
    assert not write(tiny_model, tmp_path / "two", "quant=none", "shard.count=2", "shard.index=1")
    assert not (tmp_path / "two" / MANIFEST).exists()  # no half-made dataset is visible
    assert write(tiny_model, tmp_path / "two", "quant=none", "shard.count=2", "shard.index=0")
    one, two = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert one.n_tokens == two.n_tokens and two.shard_count == 2
    tokens_one = torch.cat([c.tokens for c in all_chunks(tmp_path / "one")])
    tokens_two = torch.cat([c.tokens for c in all_chunks(tmp_path / "two")])
    assert sorted(tokens_one.tolist()) == sorted(tokens_two.tolist())
    for kind in ("mlp_in", "mlp_out"):
        for key in ("std", "mean_sq_norm", "mean_norm", "max_abs"):
            torch.testing.assert_close(
                torch.tensor(one.stats[kind][key]), torch.tensor(two.stats[kind][key]), rtol=1e-5, atol=1e-6
            )


def test_rerunning_a_finished_job_is_a_no_op(tiny_model, tmp_path):
    out = tmp_path / "ds"
    write(tiny_model, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert write(tiny_model, out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_other_settings_on_the_same_folder_are_refused(tiny_model, tmp_path):
    out = tmp_path / "ds"
    write(tiny_model, out)
    with pytest.raises(CLTError, match=r"quant.*int4|other settings"):
        write(tiny_model, out, "quant=int4")
    assert read_manifest(out).quant["scheme"] == "int8"  # nothing overwritten


def test_interrupted_job_resumes_to_the_same_bytes(tiny_model, tmp_path, monkeypatch):
    write(tiny_model, tmp_path / "whole")
    original = CacheJob._store
    calls = {"n": 0}

    def crash_after_two(self, *args):
        if self.plan.split == "train":  # (the held-out set is cached first)
            if calls["n"] == 2:
                raise KeyboardInterrupt  # as a kill would, between chunks
            calls["n"] += 1
        original(self, *args)

    monkeypatch.setattr(CacheJob, "_store", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        write(tiny_model, tmp_path / "resumed")
    monkeypatch.setattr(CacheJob, "_store", original)
    part = json.loads(next((tmp_path / "resumed" / "parts").glob("*.json")).read_text())
    assert len(part["chunks"]) == 2 and not part["complete"]
    assert write(tiny_model, tmp_path / "resumed")
    whole, resumed = read_manifest(tmp_path / "whole"), read_manifest(tmp_path / "resumed")
    assert [c.checksum for c in whole.chunks] == [c.checksum for c in resumed.chunks]
    assert whole.stats == resumed.stats


def test_a_job_killed_after_writing_statistics_does_not_count_a_chunk_twice(tiny_model, tmp_path, monkeypatch):
    """Killed after chunk 3 and its statistics are written but before the part file lists
    them: the resumed job redoes chunk 3 and its statistics equal an uninterrupted job's."""
    write(tiny_model, tmp_path / "whole")
    original = Part.save

    def crash_before_listing_chunk_3(self, out, count):
        if self.plan["split"] == "train" and len(self.chunks) == 3:
            raise KeyboardInterrupt
        original(self, out, count)

    monkeypatch.setattr(Part, "save", crash_before_listing_chunk_3)
    with pytest.raises(KeyboardInterrupt):
        write(tiny_model, tmp_path / "resumed")
    monkeypatch.setattr(Part, "save", original)
    stats_files = sorted(p.name for p in (tmp_path / "resumed" / "parts").glob("shard-*.stats.safetensors"))
    assert stats_files == [
        "shard-00000-of-00001.c000001.stats.safetensors",
        "shard-00000-of-00001.c000002.stats.safetensors",
    ]
    assert write(tiny_model, tmp_path / "resumed")
    assert read_manifest(tmp_path / "whole").stats == read_manifest(tmp_path / "resumed").stats


@pytest.mark.slow
def test_kill_9_then_rerun_completes_the_dataset(tmp_path):
    out = tmp_path / "ds"
    args = [
        sys.executable,
        "-m",
        "clt_forge",
        "cache",
        *SMALL,
        "tokens=6000",
        f"out={out}",
        f"runs={tmp_path / 'runs'}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    deadline = time.time() + 120
    part = out / "parts" / "shard-00000-of-00001.json"
    while time.time() < deadline and not (part.is_file() and len(json.loads(part.read_text())["chunks"]) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(json.loads(part.read_text())["chunks"])
    assert 3 <= done_before < 40 and not (out / MANIFEST).exists()
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out)
    assert manifest.n_tokens == 6000
    assert all(
        read_chunk(out, entry, manifest.quant_spec).tokens.numel() == entry.n_tokens for entry in manifest.chunks
    )
    assert not list(out.rglob(".*"))  # no temporary files left behind


@pytest.fixture(scope="module")
def dataset(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("reader") / "ds"
    write(tiny_model, out, "quant=none")
    return out


def collect(reader: ActivationReader, n: int):
    iterator = iter(reader)
    return [next(iterator) for _ in range(n)]


def test_reader_is_seeded_and_shuffles_across_chunks(dataset):
    a = collect(ActivationReader(dataset, 64, seed=1), 10)
    b = collect(ActivationReader(dataset, 64, seed=1), 10)
    c = collect(ActivationReader(dataset, 64, seed=2), 10)
    assert all(torch.equal(x.mlp_in, y.mlp_in) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0].tokens, c[0].tokens)
    # a batch mixes tokens from several chunks (shuffle buffer across chunks)
    chunk_of = {}
    for number, chunk in enumerate(all_chunks(dataset)):
        for row in chunk.mlp_out[:, 0, 0].tolist():
            chunk_of[row] = number
    assert len({chunk_of[row] for row in a[0].mlp_out[:, 0, 0].tolist()}) > 1


def test_reader_wraps_around_and_serves_every_token_once_per_epoch(dataset):
    reader = ActivationReader(dataset, 100, seed=0, shuffle_chunks=3)
    batches = collect(reader, 30)  # 3000 tokens = two epochs
    assert reader.tokens_served == 3000
    first_epoch = torch.cat([b.mlp_out[:, 0, 0] for b in batches])[:1500]
    expected = torch.cat([c.mlp_out[:, 0, 0] for c in all_chunks(dataset)])
    assert torch.equal(first_epoch.sort().values, expected.sort().values)


def test_reader_resumes_exactly_from_a_token_position(dataset):
    straight = collect(ActivationReader(dataset, 70, seed=3), 30)
    resumed = collect(ActivationReader(dataset, 70, seed=3, start_tokens=70 * 17), 13)
    assert all(
        torch.equal(x.mlp_in, y.mlp_in) and torch.equal(x.tokens, y.tokens)
        for x, y in zip(straight[17:], resumed, strict=True)
    )


def test_ddp_ranks_read_disjoint_chunks_and_feature_ranks_the_same(dataset):
    rank0 = ActivationReader(dataset, 10, world_size=2, rank=0)
    rank1 = ActivationReader(dataset, 10, world_size=2, rank=1)
    for epoch in range(3):
        paths0 = {c.path for g in rank0.groups(epoch) for c in g}
        paths1 = {c.path for g in rank1.groups(epoch) for c in g}
        assert not paths0 & paths1
        assert len(paths0 | paths1) == len(read_manifest(dataset).chunks)
    same_a = collect(ActivationReader(dataset, 32, seed=5), 3)
    same_b = collect(ActivationReader(dataset, 32, seed=5), 3)
    assert all(torch.equal(x.mlp_out, y.mlp_out) for x, y in zip(same_a, same_b, strict=True))


def test_corrupt_chunk_names_file_and_checksum(dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    manifest = read_manifest(copy)
    victim = copy / manifest.chunks[0].path
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CLTError, match=rf"{victim.name}.*corrupt.*checksum"):
        collect(ActivationReader(copy, 2000, shuffle_chunks=100), 1)
    victim.write_bytes(bytes(data[:-100]))
    with pytest.raises(CLTError, match=rf"{victim.name}.*truncated"):
        collect(ActivationReader(copy, 2000, shuffle_chunks=100), 1)
    with pytest.warns(UserWarning, match="skipping"):
        batches = collect(ActivationReader(copy, 1000, shuffle_chunks=100, skip_corrupt=True), 1)
    assert batches[0].tokens.numel() == 1000


def test_newer_format_version_is_refused(dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    raw = json.loads((copy / MANIFEST).read_text())
    raw["version"] += 1
    (copy / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(CLTError, match=rf"version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"):
        read_manifest(copy)
    with pytest.raises(CLTError, match="run `clt cache"):
        read_manifest(tmp_path / "nowhere")


def test_version_1_manifests_are_still_read(dataset, tmp_path):
    """Version 1 also held two constants (dtype float32, bos_stored false): read, checked, dropped."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    raw = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**raw, "version": 1, "dtype": "float32", "bos_stored": False}))
    assert read_manifest(copy) == read_manifest(dataset)
    batch = next(iter(ActivationReader(copy, 100, seed=0)))
    torch.testing.assert_close(batch.mlp_in, next(iter(ActivationReader(dataset, 100, seed=0))).mlp_in)
    (copy / MANIFEST).write_text(json.dumps({**raw, "version": 1, "dtype": "float16", "bos_stored": False}))
    with pytest.raises(CLTError, match=r"manifest.json: version 1 manifest with dtype='float16'"):
        read_manifest(copy)


def test_dataset_from_another_model_is_refused(dataset):
    manifest = read_manifest(dataset)
    with pytest.raises(
        CLTError, match=r"model: dataset 'tiny', config 'smollm2_135m'.*d_model: dataset 64, config 576"
    ):
        check_compatible(manifest, dataset, model="smollm2_135m", n_layers=3, d_model=576)


def test_on_the_fly_store_matches_the_model(tiny_model):
    cfg = cache_config(Path("unused"))
    store = ActivationsStore.from_model(tiny_model, cfg.data, 32, windows_per_forward=4, buffer_tokens=120)
    batch = next(iter(store))
    assert batch.mlp_in.shape == (32, 3, 64) and batch.mlp_out.shape == (32, 3, 64)
    with torch.no_grad():
        recomputed = tiny_model.blocks[1].mlp(batch.mlp_in[:, 1])
    torch.testing.assert_close(recomputed, batch.mlp_out[:, 1], atol=1e-5, rtol=1e-5)
    assert tiny_model.tokenizer.bos_token_id not in batch.tokens.tolist()


def test_held_out_documents_become_their_own_dataset(tiny_model, tmp_path):
    out = tmp_path / "ds"
    assert not write(
        tiny_model, out, "held_out_tokens=300", "data.held_out_fraction=0.3", "shard.count=2", "shard.index=1"
    )
    assert not (out / "held_out").exists()  # only shard 0 caches the held-out documents
    assert write(tiny_model, out, "held_out_tokens=300", "data.held_out_fraction=0.3", "shard.count=2", "shard.index=0")
    held_out, train = read_manifest(out / "held_out"), read_manifest(out)
    assert held_out.split == "held_out" and train.split == "train"
    assert held_out.n_tokens == 300
    cfg = cache_config(out, "data.held_out_fraction=0.3")
    expected = torch.stack(list(token_windows(cfg.data, tiny_model.tokenizer, "held_out"))[:20])[:, 1:].flatten()
    assert torch.equal(torch.cat([c.tokens for c in all_chunks(out / "held_out")]), expected)


def test_merge_waits_for_every_shard(tiny_model, tmp_path):
    out = tmp_path / "ds"
    write(tiny_model, out, "shard.count=3", "shard.index=2")
    assert not merge_if_complete(out, 3)
    assert Plan.from_config(cache_config(out)).n_windows == 100


def test_progress_outside_a_terminal_is_printed_as_lines(tiny_model, tmp_path, capsys):
    """A SLURM log or `> log 2>&1` sees the caching progress (tqdm hides its bar there)."""
    assert write(tiny_model, tmp_path / "ds", "quant=int8")  # pytest's captured stderr is not a TTY
    err = capsys.readouterr().err
    assert "clt cache train 0/1: 0/1.50k tok (0.0%)" in err
    assert "clt cache train 0/1: 1.50k/1.50k tok (100.0%)" in err and "ETA" in err


def test_layer_weights_fold_into_the_output_scales_and_weigh_that_layers_error():
    from clt_forge.config.compose import load_config

    norm = Normalization(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0]))
    weighted = norm.with_layer_weights({0: 4.0, 2: 0.25})
    assert weighted.out_scale.tolist() == [2.0, 5.0, 12.0] and weighted.in_scale is norm.in_scale
    error = torch.ones(1, 3, 2)  # an error of 1 in model units on every layer
    per_layer = weighted.outputs(error).square().sum(-1)[0] / norm.outputs(error).square().sum(-1)[0]
    torch.testing.assert_close(per_layer, torch.tensor([4.0, 1.0, 0.25]))
    with pytest.raises(CLTError, match="layer_weights: layer 3 is not one of the 3 layers"):
        norm.with_layer_weights({3: 2.0})
    with pytest.raises(CLTError, match="weight of layer 1 must be positive"):
        norm.with_layer_weights({1: 0.0})
    assert load_config("train", "layer_weights=[10]").layer_weights == [10.0]  # layer 0 x 10, the rest 1
