"""Hook points (issue 20, docs/hooks.md): `clt cache` at other hooks than the MLP's own input and
output (model.hook_in / model.hook_out), recorded in the manifest; training and autointerp refuse
a dataset cached at other hooks than the CLT's, and read on the fly at the CLT's hooks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from clt_forge.artifacts.activations import FORMAT_VERSION, MANIFEST, read_chunk, read_manifest
from clt_forge.artifacts.checkpoint import CheckpointInfo, check_model_matches, read_info, save_checkpoint
from clt_forge.artifacts.normalization import Normalization
from clt_forge.cache.writer import CacheJob, Plan
from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.config.compose import compose_stage
from clt_forge.config.plain import plain
from clt_forge.data import token_windows
from clt_forge.errors import CLTError
from clt_forge.models import activations as hooks_module
from clt_forge.models.activations import hook_names, mlp_activations
from clt_forge.models.loading import model_config

RESID = ["model.hook_in=hook_resid_mid", "model.hook_out=hook_mlp_out"]
SMALL = ["model=tiny", "data.context_size=16", "chunk_tokens=150", "batch_size=4", "data.max_documents=60"]
TRAIN = ["model=tiny", "data.context_size=16", "clt.d_features=32", "batch_size=60", "eval_every=2", "threads=1"]


def cache(tiny_model: Any, out: Path, *overrides: str) -> Path:
    cfg = OmegaConf.to_object(
        compose_stage("cache", [*SMALL, "tokens=600", "held_out_tokens=150", f"out={out}", *overrides])
    )
    assert CacheJob(cfg, out).run(tiny_model)  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def mlp_dataset(tiny_model, tmp_path_factory) -> Path:
    return cache(tiny_model, tmp_path_factory.mktemp("hooks") / "mlp")


@pytest.fixture(scope="module")
def resid_dataset(tiny_model, tmp_path_factory) -> Path:
    return cache(tiny_model, tmp_path_factory.mktemp("hooks") / "resid", "quant=none", *RESID)


def checkpoint(folder: Path, hook_in: str | None = None, hook_out: str | None = None) -> Path:
    """A random tiny CLT of ours trained (it says) at these hooks."""
    cfg = dataclasses.replace(model_config("tiny"), hook_in=hook_in, hook_out=hook_out)
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(cfg.n_layers, cfg.d_model, 16)
    info = CheckpointInfo(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        d_features=16,
        bandwidth=1.0,
        model=plain(cfg),
        hooks=hook_names(cfg.n_layers, hook_in, hook_out),
    )
    return save_checkpoint(folder, clt, Normalization(torch.ones(3), torch.ones(3)), info)


# ---- caching ------------------------------------------------------------------------------------


def test_caching_at_hook_resid_mid_stores_exactly_the_residual_stream_there(tiny_model, resid_dataset):
    manifest = read_manifest(resid_dataset)
    assert manifest.hooks == hook_names(3, "hook_resid_mid", "hook_mlp_out") and manifest.version == FORMAT_VERSION
    assert manifest.block_hooks == ("hook_resid_mid", "hook_mlp_out")
    assert json.loads((resid_dataset / MANIFEST).read_text())["hooks"]["mlp_in"][1] == "blocks.1.hook_resid_mid"
    assert read_manifest(resid_dataset / "held_out").block_hooks == ("hook_resid_mid", "hook_mlp_out")
    chunks = [read_chunk(resid_dataset, entry, manifest.quant_spec) for entry in manifest.chunks]
    stored_in = torch.cat([c.mlp_in for c in chunks])
    stored_out = torch.cat([c.mlp_out for c in chunks])
    data = OmegaConf.to_object(compose_stage("cache", SMALL)).data  # type: ignore[union-attr]
    windows = torch.stack(list(token_windows(data, tiny_model.tokenizer))[: manifest.n_tokens // 15])
    _, run_cache = tiny_model.run_with_cache(windows)
    for layer in range(3):  # BOS is never stored
        expected_in = run_cache[f"blocks.{layer}.hook_resid_mid"][:, 1:].flatten(0, 1)
        expected_out = run_cache[f"blocks.{layer}.hook_mlp_out"][:, 1:].flatten(0, 1)
        torch.testing.assert_close(stored_in[:, layer], expected_in, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stored_out[:, layer], expected_out, rtol=1e-5, atol=1e-6)
    mlp_in, _ = mlp_activations(tiny_model, windows[:2])
    assert not torch.allclose(stored_in[:15, 1], mlp_in[0, 1:, 1]), "another tensor than the MLP's input"


def test_the_default_hooks_are_the_mlps_own_input_and_output(mlp_dataset):
    manifest = read_manifest(mlp_dataset)
    assert manifest.hooks == hook_names(3) and manifest.block_hooks == ("mlp.hook_in", "mlp.hook_out")
    assert manifest.hooks["mlp_in"][0] == "blocks.0.mlp.hook_in" and manifest.plan["hook_in"] == "mlp.hook_in"


def test_an_old_manifest_without_hooks_reads_as_the_default_hooks(mlp_dataset, tmp_path):
    raw = json.loads((mlp_dataset / MANIFEST).read_text())
    for version, extra in ((2, {}), (1, {"dtype": "float32", "bos_stored": False})):
        old = {k: v for k, v in raw.items() if k != "hooks"} | {"version": version, **extra}
        old["plan"] = {k: v for k, v in raw["plan"].items() if k not in ("hook_in", "hook_out")}
        (tmp_path / MANIFEST).write_text(json.dumps(old))
        manifest = read_manifest(tmp_path)
        assert manifest.hooks == hook_names(3) and manifest.version == FORMAT_VERSION
    # a part file written before hooks were recorded resumes as the default hooks, not another plan
    plan = {k: v for k, v in raw["plan"].items() if k not in ("hook_in", "hook_out")}
    assert Plan(**raw["plan"]).differences(plan) == []
    assert dataclasses.replace(Plan(**raw["plan"]), hook_in="hook_resid_mid").differences(plan) == [
        "hook_in: 'mlp.hook_in' there, 'hook_resid_mid' now"
    ]


def test_an_unknown_hook_point_is_refused_naming_the_blocks_hook_points(tiny_model):
    windows = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(CLTError, match=r"'hook_resid_middle' is not a hook point of block 0 .*hook_resid_mid"):
        mlp_activations(tiny_model, windows, hooks=("hook_resid_middle", "hook_mlp_out"))


# ---- training -----------------------------------------------------------------------------------


def train_config(out: Path, *overrides: str) -> Any:
    return OmegaConf.to_object(compose_stage("train", [*TRAIN, f"out={out}", *overrides]))


def test_training_refuses_a_dataset_cached_at_other_hooks_before_reading_it(mlp_dataset, resid_dataset, tmp_path):
    from clt_forge.training.build import training_data

    parallel = SimpleNamespace(world=1)
    cfg = train_config(tmp_path / "a", f"activations={mlp_dataset}", *RESID)
    with pytest.raises(CLTError) as refused:
        training_data(cfg, parallel)  # type: ignore[arg-type]
    message = str(refused.value)
    assert f"activations={mlp_dataset} were cached at hook_in=mlp.hook_in, hook_out=mlp.hook_out" in message
    assert "model.hook_in / model.hook_out of model tiny) reads hook_in=hook_resid_mid" in message
    assert "`clt cache model=tiny model.hook_in=hook_resid_mid model.hook_out=hook_mlp_out out=NEW_FOLDER`" in message
    cfg = train_config(tmp_path / "b", f"activations={resid_dataset}")  # the default hooks now
    with pytest.raises(CLTError, match=r"cached at hook_in=hook_resid_mid.*reads hook_in=mlp\.hook_in"):
        training_data(cfg, parallel)  # type: ignore[arg-type]


def test_a_clt_trained_at_hook_resid_mid_records_its_hooks(resid_dataset, tmp_path):
    from clt_forge.training import CLTTrainingRunner

    run = CLTTrainingRunner(train_config(tmp_path / "run", f"activations={resid_dataset}", "tokens=120", *RESID)).run()
    info = read_info(run / "checkpoints" / "final")
    assert info.hooks == hook_names(3, "hook_resid_mid", "hook_mlp_out")
    assert (info.model["hook_in"], info.model["hook_out"]) == ("hook_resid_mid", "hook_mlp_out")


def test_a_finetune_reads_the_hooks_its_checkpoint_declares(mlp_dataset, resid_dataset, tmp_path):
    from clt_forge.training.build import run_hooks, training_data

    source = checkpoint(tmp_path / "ckpt", "hook_resid_mid", "hook_mlp_out")
    finetune = [f"finetune.source={source}", "finetune.rank=2"]
    cfg = train_config(tmp_path / "a", f"activations={mlp_dataset}", *finetune)
    with pytest.raises(CLTError, match=rf"the CLT \(finetune.from={source}\) reads hook_in=hook_resid_mid"):
        training_data(cfg, SimpleNamespace(world=1))  # type: ignore[arg-type]
    cfg = train_config(tmp_path / "b", f"activations={resid_dataset}", *finetune)
    assert run_hooks(cfg) == (("hook_resid_mid", "hook_mlp_out"), f"finetune.from={source}")
    assert (cfg.model.hook_in, cfg.model.hook_out) == ("hook_resid_mid", "hook_mlp_out"), "recorded by the run"
    cfg = train_config(tmp_path / "c", f"activations={resid_dataset}", *finetune, "model.hook_in=ln2.hook_normalized")
    with pytest.raises(CLTError, match=r"blocks\.0\.hook_resid_mid .*model tiny declares blocks\.0\.ln2"):
        training_data(cfg, SimpleNamespace(world=1))  # type: ignore[arg-type]


def recorded_hooks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The hooks every forward of clt_forge.models.activations reads at, from now on."""
    seen: list[tuple[str, str]] = []
    record = hooks_module._record

    def spy(*args: Any, **kwargs: Any) -> None:
        seen.append(kwargs.get("hooks", args[5] if len(args) > 5 else hooks_module.DEFAULT_HOOKS))
        record(*args, **kwargs)

    monkeypatch.setattr(hooks_module, "_record", spy)
    return seen


def test_training_on_the_fly_reads_the_declared_hooks(monkeypatch, tmp_path):
    from clt_forge.training.build import training_data

    seen = recorded_hooks(monkeypatch)
    cfg = train_config(tmp_path / "run", "data.source=model", "eval_tokens=30", "windows_per_forward=2", *RESID)
    store, held = training_data(cfg, SimpleNamespace(world=1))  # type: ignore[arg-type]
    next(iter(store))
    assert seen and set(seen) == {("hook_resid_mid", "hook_mlp_out")}
    assert held.x.shape[1:] == (3, 64)


# ---- autointerp ---------------------------------------------------------------------------------


def autointerp_config(out: Path, *overrides: str) -> Any:
    base = ["model=tiny", "data.context_size=16", "explainer=none", "explain=false", "score=false", "threads=1"]
    return OmegaConf.to_object(compose_stage("autointerp", [*base, "tokens=150", "top_k=2", f"out={out}", *overrides]))


def test_autointerp_refuses_a_dataset_at_other_hooks_before_loading_anything(mlp_dataset, monkeypatch, tmp_path):
    from clt_forge.autointerp import runner

    def heavy(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("loaded before the hooks were checked")

    monkeypatch.setattr(runner, "load_features", heavy)
    monkeypatch.setattr(runner, "load_model", heavy)
    ckpt = checkpoint(tmp_path / "ckpt", "hook_resid_mid", "hook_mlp_out")
    cfg = autointerp_config(tmp_path / "out", f"activations={mlp_dataset}", f"checkpoint={ckpt}")
    with pytest.raises(CLTError) as refused:
        runner.AutoInterp(cfg).run()
    message = str(refused.value)
    assert "cached at hook_in=mlp.hook_in, hook_out=mlp.hook_out" in message
    assert f"the CLT (checkpoint {ckpt}) reads hook_in=hook_resid_mid and writes hook_out=hook_mlp_out" in message
    assert "clt cache model=tiny model.hook_in=hook_resid_mid model.hook_out=hook_mlp_out" in message


def test_autointerp_accepts_a_dataset_at_its_hooks_and_reads_on_the_fly_at_them(resid_dataset, monkeypatch, tmp_path):
    from clt_forge.autointerp.runner import AutoInterp

    ckpt = checkpoint(tmp_path / "ckpt", "hook_resid_mid", "hook_mlp_out")
    assert AutoInterp(autointerp_config(tmp_path / "a", f"activations={resid_dataset}", f"checkpoint={ckpt}")).run()
    seen = recorded_hooks(monkeypatch)
    assert AutoInterp(autointerp_config(tmp_path / "b", f"checkpoint={ckpt}")).run()
    assert seen and set(seen) == {("hook_resid_mid", "hook_mlp_out")}


def test_the_on_the_fly_windows_are_the_residual_stream_at_the_declared_hook(tiny_model):
    from clt_forge.autointerp.source import model_windows

    data = OmegaConf.to_object(compose_stage("cache", SMALL)).data  # type: ignore[union-attr]
    _, batches = model_windows(tiny_model, data, windows_per_forward=2, hooks=("hook_resid_mid", "hook_mlp_out"))
    tokens, x = next(batches)
    bos = torch.full((tokens.shape[0], 1), tiny_model.tokenizer.bos_token_id)
    _, run_cache = tiny_model.run_with_cache(torch.cat([bos, tokens], dim=1))
    for layer in range(3):
        torch.testing.assert_close(x[:, :, layer], run_cache[f"blocks.{layer}.hook_resid_mid"][:, 1:])


# ---- model configs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma2_2b", "llama1b"])
def test_the_published_clts_models_declare_their_hooks_and_a_mismatch_is_refused(name):
    cfg = model_config(name)
    assert (cfg.hook_in, cfg.hook_out) == ("hook_resid_mid", "hook_mlp_out")
    info = CheckpointInfo(
        cfg.n_layers, cfg.d_model, 8, 1.0, {"hf_name": cfg.hf_name}, hook_names(cfg.n_layers, cfg.hook_in, cfg.hook_out)
    )
    check_model_matches(info, "published", cfg)
    ours = dataclasses.replace(info, hooks=hook_names(cfg.n_layers))
    with pytest.raises(
        CLTError, match=rf"mlp_in at blocks\.0\.mlp\.hook_in .*model {name} declares blocks\.0\.hook_resid_mid"
    ):
        check_model_matches(ours, "ours", cfg)
    with pytest.raises(CLTError, match=r"n_layers: checkpoint 2, config"):
        check_model_matches(dataclasses.replace(info, n_layers=2), "short", cfg)
