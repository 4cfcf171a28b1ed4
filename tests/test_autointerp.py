"""`clt autointerp` on the tiny model: the streaming pass against brute force on a planted
feature, worker split + merge, resume after kill -9, feature JSON export, graph selection."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from clt_forge.artifacts.activations import read_chunk, read_manifest
from clt_forge.artifacts.checkpoint import CheckpointInfo, save_checkpoint
from clt_forge.artifacts.feature_json import cantor, feature_json
from clt_forge.artifacts.features import FeatureStore, merge_stores, read_explanations
from clt_forge.artifacts.normalization import Normalization
from clt_forge.autointerp.collect import HIST_EDGES, Collector, FeatureSlice
from clt_forge.autointerp.runner import AutoInterp, select_features
from clt_forge.cache.writer import CacheJob
from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.config.compose import compose_stage
from clt_forge.config.plain import plain
from clt_forge.errors import CLTError
from clt_forge.models.activations import hook_names
from clt_forge.models.loading import model_config

REPO = Path(__file__).resolve().parents[1]
PLANTED = (1, 3)  # (layer, feature) planted to fire on TOKEN
TOKEN = ord("e")  # the byte tokenizer's id of "e"


def dataset_arrays(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    manifest = read_manifest(folder)
    chunks = [read_chunk(folder, entry, manifest.quant_spec) for entry in manifest.chunks]
    return torch.cat([c.tokens for c in chunks]), torch.cat([c.mlp_in for c in chunks])


@pytest.fixture(scope="module")
def dataset(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("autointerp") / "acts"
    # data=classic: the planted-feature tests were tuned on this text (the scorer's 5 + 5 contexts)
    overrides = [
        "model=tiny",
        "data=classic",
        "data.context_size=32",
        "tokens=4000",
        "chunk_tokens=310",
        "quant=none",
        f"out={out}",
    ]
    CacheJob(OmegaConf.to_object(compose_stage("cache", overrides)), out).run(tiny_model)
    return out


@pytest.fixture(scope="module")
def planted(dataset, tmp_path_factory) -> Path:
    """A random CLT whose feature PLANTED reads the direction of TOKEN's MLP inputs."""
    tokens, mlp_in = dataset_arrays(dataset)
    cfg = model_config("tiny")
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(cfg.n_layers, cfg.d_model, 24, jumprelu_threshold=0.5)
    norm = Normalization(mlp_in.square().mean(dim=(0, 2)).sqrt(), torch.ones(cfg.n_layers))
    layer, feature = PLANTED
    x = norm.inputs(mlp_in)[:, layer]
    direction = x[tokens == TOKEN].mean(0) - x[tokens != TOKEN].mean(0)
    scores = x @ direction
    with torch.no_grad():
        clt.W_enc[layer][:, feature] = direction
        on, off = scores[tokens == TOKEN], scores[tokens != TOKEN]
        clt.b_enc[layer, feature] = -float(off.quantile(0.98))
        clt.log_threshold[layer, feature] = float(torch.tensor(0.01).log())
    info = CheckpointInfo(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        d_features=24,
        bandwidth=1.0,
        model=plain(cfg),
        hooks=hook_names(cfg.n_layers),
    )
    assert on.median() > off.quantile(0.98), "the planted direction separates the token"
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "planted", clt, norm, info)


def autointerp_config(out: Path, *overrides: str):
    base = [
        "model=tiny",
        "data=classic",
        "data.context_size=32",
        "explainer=none",
        "tokens=4000",
        "top_k=5",
        "threads=1",
        f"out={out}",
    ]
    return OmegaConf.to_object(compose_stage("autointerp", [*base, *overrides]))


def brute_force_top(
    dataset: Path, checkpoint: Path, layer: int, feature: int, k: int
) -> tuple[list[int], torch.Tensor]:
    from clt_forge.artifacts.checkpoint import load_checkpoint

    _, mlp_in = dataset_arrays(dataset)
    clt, norm, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        _, z = clt.encode(norm.inputs(mlp_in))
    top = z[:, layer, feature].topk(k)
    return top.indices.tolist(), top.values


def test_pass_keeps_exactly_the_brute_force_top_contexts(dataset, planted, tmp_path):
    db = AutoInterp(autointerp_config(tmp_path, f"activations={dataset}", f"checkpoint={planted}")).run()
    positions, values = brute_force_top(dataset, planted, *PLANTED, k=5)
    tokens, _ = dataset_arrays(dataset)
    with FeatureStore(db, create=False) as store:
        top = store.examples(*PLANTED, "top")
        record = store.feature(*PLANTED)
        assert record is not None
        assert [e["position"] for e in top] == positions
        torch.testing.assert_close(torch.tensor([e["value"] for e in top]), values, rtol=1e-4, atol=1e-5)
        for example in top:  # the window around each: the stored tokens, the activation at the centre
            centre = example["center"]
            assert example["token_ids"][centre] == int(tokens[example["position"]]) == TOKEN
            assert example["acts"][centre] == pytest.approx(example["value"], rel=1e-4)
            assert len(example["token_ids"]) <= 5 + 24 + 8
        assert record["top_tokens"][0][0] == "e"
        assert 0 < record["frequency"] < 0.5 and sum(record["histogram"]) == record["n_active"]
        assert len(record["histogram"]) == len(HIST_EDGES) + 1
        for example in store.examples(*PLANTED, "silent"):
            assert max(example["acts"]) == 0.0
        evidence = store.evidence(*PLANTED)
        assert evidence.activating and all(max(e.acts) > 0 for e in evidence.activating)
        assert not {e["position"] for e in top} & {e["position"] for e in store.examples(*PLANTED, "sample")} - {
            e["position"] for e in top
        }


def test_collector_keeps_every_features_brute_force_top_contexts_and_statistics():
    """Random encoder, many batches: top-K reservoirs (values, positions, context windows) and
    the count/sum/max/histogram of every feature equal a brute-force pass over all tokens."""
    n_layers, d_model, n, windows, length, batches = 3, 16, 40, 4, 16, 25
    g = torch.Generator().manual_seed(1)
    encoder = FeatureSlice(
        [layer for layer in range(n_layers) for _ in range(n)],
        [f for _ in range(n_layers) for f in range(n)],
        [torch.randn(n, d_model, generator=g) for _ in range(n_layers)],
        [torch.randn(n, generator=g) * 0.5 - 1.0 for _ in range(n_layers)],
        [torch.rand(n, generator=g) * 0.3 for _ in range(n_layers)],
        torch.ones(n_layers),
    )
    collector = Collector(encoder, top_k=6, sample=5, silent=4, before=3, after=2, seed=7, silent_every=16)
    all_tokens, all_z = [], []
    for _ in range(batches):
        tokens = torch.randint(0, 50, (windows, length), generator=g)
        all_tokens.append(tokens.reshape(-1))
        all_z.append(collector.update(tokens, torch.randn(windows, length, n_layers, d_model, generator=g)).clone())
    tokens, z = torch.cat(all_tokens), torch.cat(all_z, dim=1)  # [T], [N, T]
    assert torch.equal(collector.count, (z > 0).sum(1))
    torch.testing.assert_close(collector.total, z.double().sum(1))
    assert torch.equal(collector.max, z.max(1).values)
    bins = torch.bucketize(z, HIST_EDGES.float(), right=True)
    expected_histogram = torch.stack(
        [torch.bincount(bins[f][z[f] > 0], minlength=len(HIST_EDGES) + 1) for f in range(len(z))]
    )
    assert torch.equal(collector.histogram, expected_histogram)
    top = collector.top
    for f in range(len(z)):
        best = z[f].topk(6)
        kept = torch.argsort(top.keys[f], descending=True)
        assert top.positions[f, kept].tolist() == best.indices.tolist()
        assert torch.equal(top.values[f, kept], best.values)
        for slot, t in zip(kept.tolist(), best.indices.tolist(), strict=True):
            start = t - t % length
            span = range(max(t - 3, start), min(t + 3, start + length))
            window = [int(tokens[i]) if i in span else -1 for i in range(t - 3, t + 3)]
            assert top.tokens[f, slot].tolist() == window
            assert top.acts[f, slot].tolist() == [float(z[f, i]) if i in span else 0.0 for i in range(t - 3, t + 3)]


def test_two_workers_merged_equal_one_worker(dataset, planted, tmp_path):
    single = AutoInterp(autointerp_config(tmp_path / "one", f"activations={dataset}", f"checkpoint={planted}")).run()
    parts = tmp_path / "two"
    for index in (0, 1):
        cfg = autointerp_config(
            parts, f"activations={dataset}", f"checkpoint={planted}", "worker.count=2", f"worker.index={index}"
        )
        result = AutoInterp(cfg).run()
    assert result == parts / "features.db", "the last worker to finish merges"
    rows = {}
    for path in (single, result):
        with sqlite3.connect(path) as db:
            rows[path] = (
                db.execute("SELECT * FROM features ORDER BY layer, feature").fetchall(),
                db.execute("SELECT * FROM examples ORDER BY layer, feature, kind, rank").fetchall(),
            )
    assert rows[single] == rows[result]
    assert len(rows[single][0]) == 3 * 24
    with pytest.raises(CLTError, match="repeats features"):
        merge_stores([parts / "features.worker-000-of-002.db"] * 2, tmp_path / "bad.db")


def test_select_features_from_a_graph_and_by_worker(tmp_path):
    graph = tmp_path / "g.json"
    nodes = [
        {"node_id": "2_7_3", "layer": "2", "feature_type": "cross layer transcoder"},
        {"node_id": "0_5_1", "layer": "0", "feature_type": "cross layer transcoder"},
        {"node_id": "err_0_5_1", "layer": "0", "feature_type": "mlp reconstruction error"},
        {"node_id": "2_7_4", "layer": "2", "feature_type": "cross layer transcoder"},
    ]
    graph.write_text(json.dumps({"nodes": nodes}))
    assert select_features(3, 24, str(graph), 0, 1) == [(0, 5), (2, 7)]
    assert select_features(3, 24, str(graph), 1, 2) == [(2, 7)]
    assert len(select_features(3, 24, None, 0, 1)) == 72
    with pytest.raises(CLTError, match=r"worker\.index=2"):
        select_features(3, 24, None, 2, 2)


def test_export_writes_circuit_tracer_feature_files(dataset, planted, tmp_path):
    export = tmp_path / "features"
    AutoInterp(autointerp_config(tmp_path, f"activations={dataset}", f"checkpoint={planted}", f"export={export}")).run()
    document = json.loads((export / f"{cantor(*PLANTED)}.json").read_text())
    from circuit_tracer.frontend.graph_models import Node

    # the file is named by the `feature` id circuit-tracer's graph JSON gives this node
    assert document["index"] == cantor(*PLANTED) == Node.feature_node(PLANTED[0], 0, PLANTED[1]).feature
    for key in (
        "examples_quantiles",
        "top_logits",
        "bottom_logits",
        "act_min",
        "act_max",
        "histogram",
        "activation_frequency",
        "quantile_values",
    ):
        assert key in document
    top = document["examples_quantiles"][0]
    assert top["quantile_name"] == "Top activations" and len(top["examples"]) == 5
    example = top["examples"][0]
    assert example["tokens"][example["train_token_ind"]] == "e"
    assert len(example["tokens"]) == len(example["tokens_acts_list"])
    assert max(example["tokens_acts_list"]) == pytest.approx(document["act_max"], rel=1e-4)
    with FeatureStore(tmp_path / "features.db", create=False) as store:
        record = store.feature(*PLANTED)
    assert record is not None and sum(document["histogram"]) == record["n_active"]
    assert document["activation_frequency"] == record["frequency"]
    assert len(document["top_logits"]) == 10


def test_export_honours_histogram_bins_and_quantiles(dataset, planted, tmp_path):
    export = tmp_path / "features"
    cfg = autointerp_config(
        tmp_path,
        f"activations={dataset}",
        f"checkpoint={planted}",
        f"export={export}",
        "histogram_bins=7",
        "quantiles=2",
        "per_quantile=3",
    )
    AutoInterp(cfg).run()
    document = json.loads((export / f"{cantor(*PLANTED)}.json").read_text())
    assert len(document["histogram"]) == 7
    bands = [q["quantile_name"] for q in document["examples_quantiles"][1:]]
    assert bands == ["Subsample interval 0", "Subsample interval 1"]
    with FeatureStore(tmp_path / "features.db", create=False) as store:
        assert store.meta()["display"] == {"histogram_bins": 7, "quantiles": 2}
        assert len(feature_json(store, *PLANTED)["histogram"]) == 7  # what `clt serve` shows too


def test_on_the_fly_pass_matches_the_cached_one(dataset, planted, tmp_path):
    cached = AutoInterp(
        autointerp_config(tmp_path / "a", f"activations={dataset}", f"checkpoint={planted}", "tokens=1000")
    ).run()
    live = AutoInterp(autointerp_config(tmp_path / "b", f"checkpoint={planted}", "tokens=1000")).run()
    with FeatureStore(cached, create=False) as a, FeatureStore(live, create=False) as b:
        top_a = [e["position"] for e in a.examples(*PLANTED, "top")]
        top_b = [e["position"] for e in b.examples(*PLANTED, "top")]
        assert a.meta()["tokens"] == b.meta()["tokens"]
        assert top_a == top_b


def test_database_version_and_missing_file_errors(tmp_path):
    with pytest.raises(CLTError, match="no feature database"):
        read_explanations(tmp_path / "none.db")
    path = tmp_path / "future.db"
    with FeatureStore(path) as store:
        store.set_meta(version=99)
    with pytest.raises(CLTError, match="version 99"):
        FeatureStore(path)


@pytest.mark.slow
def test_killed_worker_resumes_without_redoing_finished_features(dataset, planted, tmp_path):
    graph = tmp_path / "graph.json"  # three features, so the local explainer is quick
    nodes = [
        {"node_id": f"{layer}_{feature}_1", "layer": str(layer), "feature_type": "cross layer transcoder"}
        for layer, feature in [PLANTED, (0, 1), (2, 5)]
    ]
    graph.write_text(json.dumps({"nodes": nodes}))
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "clt_forge",
        "autointerp",
        "model=tiny",
        "data=classic",
        "data.context_size=32",
        f"activations={dataset}",
        f"checkpoint={planted}",
        f"features_from={graph}",
        "tokens=4000",
        "explainer=local",
        "silent_every=32",
        "threads=1",
        f"out={out}",
    ]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    db = out / "features.db"
    deadline = time.time() + 300
    explained: list[tuple[int, int, str]] = []
    while time.time() < deadline and process.poll() is None:
        if db.is_file():
            try:
                with sqlite3.connect(db, timeout=1) as conn:
                    explained = conn.execute(
                        "SELECT layer, feature, explanation FROM features WHERE status = 'scored'"
                    ).fetchall()
            except sqlite3.OperationalError:
                pass
            if explained:
                break
        time.sleep(0.2)
    assert explained, (
        f"no feature was scored before the deadline: {process.stderr.read().decode() if process.poll() is not None else ''}"
    )
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    with sqlite3.connect(db) as conn:  # mark a finished feature: a re-run must not touch it
        conn.execute("UPDATE features SET explanation = 'SENTINEL' WHERE layer = ? AND feature = ?", explained[0][:2])
        meta_before = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with FeatureStore(db, create=False) as store:
        assert store.meta()["pass_seconds"] == json.loads(meta_before["pass_seconds"]), "the pass was not redone"
        assert store.feature(*explained[0][:2])["explanation"] == "SENTINEL"  # type: ignore[index]
        statuses = [store.feature(layer, feature)["status"] for layer, feature in store.features()]  # type: ignore[index]
        assert statuses == ["scored"] * 3
        assert all(store.feature(*key)["explanation"] for key in store.features())  # type: ignore[index]
    summary = json.loads((out / "summary.json").read_text())
    scores = summary["detection_scores"]  # NaN (missing) where a feature had no silent context to show
    assert summary["explained"] == 3 and scores["count"] + scores["missing"] == 3 and scores["count"] >= 1


def test_dry_run_prints_one_explanation_prompt(dataset, planted, tmp_path):
    command = [
        sys.executable,
        "-m",
        "clt_forge",
        "autointerp",
        "--dry-run",
        "model=tiny",
        "data=classic",
        "data.context_size=32",
        f"activations={dataset}",
        f"checkpoint={planted}",
        "tokens=2000",
        "threads=1",
        f"out={tmp_path}",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "<<" in done.stdout and ">>" in done.stdout, "the prompt highlights the activating tokens"
    with FeatureStore(tmp_path / "features.db", create=False) as store:
        assert not store.explanations(), "a dry run explains nothing"
