"""`clt train` on the tiny model: metrics, checkpoints, exact resume after kill -9, L0 targets,
NaN stops, mismatches, LoRA finetuning, schedules, fp16 loss scaling, extending a finished run
and progress lines outside a terminal."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from clt_forge.cache.writer import CacheJob
from clt_forge.config.compose import compose_stage
from clt_forge.config.schema import OptimConfig, SparsityConfig
from clt_forge.errors import CLTError
from clt_forge.progress import LineProgress, progress_bar
from clt_forge.training import CLTTrainingRunner, load_checkpoint
from clt_forge.training import runner as runner_module
from clt_forge.training.metrics import read_metrics
from clt_forge.training.schedules import l0_coefficient, lr_multiplier

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["model=tiny", "data.context_size=32", "clt.d_features=96", "batch_size=128", "eval_every=10", "log_every=1"]


@pytest.fixture(scope="module")
def dataset(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "acts"
    overrides = [
        "model=tiny",
        "data.context_size=32",
        "tokens=6000",
        "chunk_tokens=310",
        "held_out_tokens=620",
        f"out={out}",
    ]
    CacheJob(OmegaConf.to_object(compose_stage("cache", overrides)), out).run(tiny_model)
    return out


def train_config(dataset: Path, out: Path, *overrides: str):
    return OmegaConf.to_object(compose_stage("train", [*TRAIN, f"activations={dataset}", f"out={out}", *overrides]))


def train(dataset: Path, out: Path, *overrides: str) -> Path:
    return CLTTrainingRunner(train_config(dataset, out, *overrides)).run()


def test_schedules_have_the_paper_shapes():
    warm = SparsityConfig(l0_coefficient=4.0, warmup_fraction=0.5)
    assert [l0_coefficient(s, 100, warm) for s in (0, 25, 50, 99)] == [0.0, 2.0, 4.0, 4.0]
    delayed = SparsityConfig(schedule="delayed_linear", l0_coefficient=2.0, delay_fraction=0.2)  # type: ignore[arg-type]
    assert l0_coefficient(10, 100, delayed) == 0.0 and l0_coefficient(60, 100, delayed) == pytest.approx(1.0)
    cosine = OptimConfig(lr_schedule="cosine", lr_warmup_fraction=0.1, lr_final_fraction=0.0)  # type: ignore[arg-type]
    assert lr_multiplier(0, 100, cosine) == pytest.approx(0.1)
    assert lr_multiplier(10, 100, cosine) == pytest.approx(1.0)
    assert lr_multiplier(100, 100, cosine) == pytest.approx(0.0, abs=1e-9)


def test_training_logs_evaluates_checkpoints_and_plots(dataset, tmp_path):
    run = train(dataset, tmp_path / "run", "tokens=7680", "checkpoint_every=20", "optim.lr=1e-3")
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in steps] == list(range(60))
    assert {"loss", "mse", "sparsity", "dead", "l0_coefficient", "lr", "grad_norm"} <= set(steps[0])
    assert all(len(r[k]) == 3 for r in evals for k in ("explained_variance", "nmse", "l0", "dead_features"))
    assert evals[0]["eval_source"].endswith("held_out")
    assert evals[-1]["ev_mean"] > evals[0]["ev_mean"] + 0.1
    assert {p.name for p in (run / "plots").glob("*.png")} == {
        "l0_coefficient.png",
        "l0_per_layer.png",
        "dead_per_layer.png",
        "explained_variance.png",
    }
    _, norm, info = load_checkpoint(run / "checkpoints" / "final")
    assert (info.n_layers, info.d_model, info.d_features, info.step) == (3, 64, 96, 60)
    assert norm.in_scale.shape == (3,) and torch.all(norm.in_scale > 0)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000020", "step-00000040"]


def test_cpu_training_keeps_freed_memory_unless_told_not_to(dataset, tmp_path, monkeypatch):
    calls: list[bool] = []
    monkeypatch.setattr(runner_module, "keep_freed_memory", lambda: calls.append(True) or True)
    train(dataset, tmp_path / "kept", "tokens=256")
    assert calls == [True]
    train(dataset, tmp_path / "system", "tokens=256", "keep_freed_memory=false")
    assert calls == [True]


def test_kill_9_then_resume_continues_the_same_loss_curve(dataset, tmp_path):
    common = [*TRAIN, f"activations={dataset}", "tokens=12800", "checkpoint_every=10", "optim.lr=1e-3", "threads=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    whole = tmp_path / "whole"
    subprocess.run(
        [sys.executable, "-m", "clt_forge", "train", *common, f"out={whole}"],
        check=True,
        env=env,
        cwd=REPO,
        capture_output=True,
    )
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clt_forge", "train", *common, f"out={killed}"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "step-00000040" / "training_state.pt").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "final").exists()
    result = subprocess.run(  # the run's recorded config is used: no other argument needed
        [sys.executable, "-m", "clt_forge", "train", f"resume={killed}", "threads=1"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    curve = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]  # noqa: E731
    assert [s for s, _ in curve(killed)] == list(range(100))
    for (step, a), (_, b) in zip(curve(whole), curve(killed), strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"step {step}"
    final_a, _, _ = load_checkpoint(whole / "checkpoints" / "final")
    final_b, _, _ = load_checkpoint(killed / "checkpoints" / "final")
    for (name, a), (_, b) in zip(final_a.state_dict().items(), final_b.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_l0_targets_save_and_optimal_l0_stops(dataset, tmp_path):
    run = train(
        dataset,
        tmp_path / "run",
        "tokens=25600",
        "optim.lr=3e-3",
        "sparsity.l0_coefficient=20",
        "checkpoint_l0=[40,20]",
        "optimal_l0=20",
    )
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["l0_mean"] <= 20 and evals[-1]["step"] < 199  # stopped early
    first_below_40 = next(r for r in evals if r["l0_mean"] <= 40)
    _, _, info = load_checkpoint(run / "checkpoints" / "l0-40")
    assert info.step == first_below_40["step"] + 1
    assert (run / "checkpoints" / "l0-20").is_dir()


def test_nan_stops_with_step_term_and_last_good_checkpoint(dataset, tmp_path):
    with pytest.raises(
        CLTError,
        match=r"step \d+: the (mse|sparsity|dead|total) loss term is (nan|inf).*last good checkpoint is .*step-",
    ):
        train(dataset, tmp_path / "run", "tokens=25600", "optim.lr=1e30", "optim.grad_clip=0", "checkpoint_every=1")
    clt, _, _ = load_checkpoint(sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1])
    assert all(torch.isfinite(p).all() for p in clt.parameters())


def test_dataset_of_another_model_is_refused(dataset, tmp_path):
    with pytest.raises(CLTError, match=r"model: dataset 'tiny', config 'smollm2_135m'"):
        train(dataset, tmp_path / "run", "model=smollm2_135m")


def test_resume_with_another_architecture_is_refused(dataset, tmp_path):
    run = train(dataset, tmp_path / "run", "tokens=1280", "checkpoint_every=5")
    with pytest.raises(CLTError, match=r"clt.d_features: 96 -> 128"):
        train(dataset, tmp_path / "other", "tokens=1280", f"resume={run}", "clt.d_features=128")


def test_skip_connection_trains_and_a_resume_keeps_it(dataset, tmp_path):
    run = train(dataset, tmp_path / "run", "tokens=1280", "checkpoint_every=5", "clt.skip=true")
    clt, _, _ = load_checkpoint(run / "checkpoints" / "final")
    assert clt.W_skip is not None and clt.W_skip.abs().max() > 0, "W_skip starts at zero and was trained"
    with pytest.raises(CLTError, match=r"clt.skip: True -> False"):
        train(dataset, tmp_path / "other", "tokens=1280", f"resume={run}")


def test_lora_finetuning_trains_only_low_rank_adapters(dataset, tmp_path):
    base_run = train(dataset, tmp_path / "base", "tokens=2560")
    base, _, _ = load_checkpoint(base_run / "checkpoints" / "final")
    tuned_run = train(
        dataset,
        tmp_path / "tuned",
        "tokens=2560",
        f"finetune.source={base_run / 'checkpoints' / 'final'}",
        "finetune.rank=2",
        "optim.lr=1e-2",
    )
    tuned, _, info = load_checkpoint(tuned_run / "checkpoints" / "final")
    assert info.d_features == 96
    delta_enc = tuned.W_enc - base.W_enc
    delta_dec = (tuned.W_dec - base.W_dec).reshape(96, -1)
    assert delta_enc.abs().max() > 1e-4 and delta_dec.abs().max() > 1e-4
    assert all(torch.linalg.matrix_rank(delta_enc[layer], atol=1e-5) <= 2 for layer in range(3))
    assert torch.linalg.matrix_rank(delta_dec, atol=1e-5) <= 2
    torch.testing.assert_close(tuned.b_enc, base.b_enc)
    torch.testing.assert_close(tuned.log_threshold, base.log_threshold)


def test_plot_command_redraws_the_figures(dataset, tmp_path):
    run = train(dataset, tmp_path / "run", "tokens=1280")
    for png in (run / "plots").glob("*.png"):
        png.unlink()
    CLTTrainingRunner(train_config(dataset, tmp_path / "unused", f"plot={run}")).run()
    assert len(list((run / "plots").glob("*.png"))) == 4
    assert json.loads((run / "train_config.json").read_text())["clt"]["d_features"] == 96


def test_plot_of_a_sweep_folder_draws_ev_against_l0(dataset, tmp_path):
    from clt_forge.training.sweep import sweep_rows

    sweep = tmp_path / "sweep"
    for job, coefficient in (("0", "0.5"), ("1", "50")):
        train(dataset, sweep / job, "tokens=2560", f"sparsity.l0_coefficient={coefficient}", "sparsity=constant")
    CLTTrainingRunner(train_config(dataset, tmp_path / "unused", f"plot={sweep}")).run()
    assert (sweep / "sweep.png").is_file()
    rows = {r["l0_coefficient"]: r for r in json.loads((sweep / "sweep.json").read_text())}
    assert rows[50.0]["l0_mean"] < rows[0.5]["l0_mean"], "a larger coefficient gives a sparser CLT"
    assert rows == {r["l0_coefficient"]: r for r in sweep_rows(sweep)}


# -- fp16 with a loss scaler (issue 15) ------------------------------------------------------------
FP16 = ["precision=fp16", "grad_scale_init=16777216", "optim.lr=1e-3", "tokens=3840"]  # 2^24: overflows at first


def train_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def checkpoint_state(folder: Path) -> dict:
    return torch.load(folder / "training_state.pt", weights_only=False)


def test_fp16_with_a_huge_loss_scale_skips_steps_then_recovers(dataset, tmp_path):
    run = train(dataset, tmp_path / "run", *FP16, "checkpoint_every=1", "keep_checkpoints=100")
    records = train_records(run)
    skipped = [r["skipped"] for r in records]
    n = skipped.index(False)
    assert n >= 3, skipped  # 2^24 overflows float16 gradients: the first steps are skipped
    assert sum(skipped[n:]) <= len(skipped[n:]) // 5, skipped  # then the scale fits (a rare overflow later)
    scales = [r["grad_scale"] for r in records]
    assert scales[0] == 2.0**24
    for step, (scale, after) in enumerate(itertools.pairwise(scales)):
        assert after == (scale / 2 if skipped[step] else scale), f"step {step}: an overflow halves the scale"
    assert all(math.isfinite(r["loss"]) for r in records)
    assert all(math.isfinite(r["grad_norm"]) != r["skipped"] for r in records)
    checkpoints = run / "checkpoints"
    weights = [load_checkpoint(checkpoints / f"step-{s:08d}")[0].state_dict() for s in range(1, len(records))]
    for step, (before, after) in enumerate(itertools.pairwise(weights), start=1):  # around step `step`
        moved = any(not torch.equal(after[name], before[name]) for name in before)
        assert moved != skipped[step], f"step {step}: skipped={skipped[step]}, weights moved={moved}"
    final = checkpoint_state(checkpoints / "final")
    assert final["adam_step"] == skipped.count(False), "Adam stepped once per step that was not skipped"
    assert final["grad_scaler"]["scale"] == scales[-1] / (2 if skipped[-1] else 1)
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["ev_mean"] > evals[0]["ev_mean"] + 0.05, "it learns once the scale fits"


def test_fp16_resume_restores_the_loss_scale(dataset, tmp_path):
    whole = train(dataset, tmp_path / "whole", *FP16, "checkpoint_every=2", "keep_checkpoints=100")
    skipped = [r["skipped"] for r in train_records(whole)]
    assert skipped[:4] == [True] * 4, "the checkpoint at step 2 sits among the skipped steps"
    mid = checkpoint_state(whole / "checkpoints" / "step-00000002")
    assert mid["grad_scaler"]["scale"] == 2.0**22
    resumed = tmp_path / "resumed"  # the same run killed after its step-2 checkpoint
    shutil.copytree(whole, resumed)
    for folder in (resumed / "checkpoints").iterdir():
        if folder.name != "step-00000002":
            shutil.rmtree(folder)
    train(dataset, resumed, *FP16, "checkpoint_every=2", "keep_checkpoints=100", f"resume={resumed}")
    a, b = train_records(whole), train_records(resumed)
    assert [(r["step"], r["skipped"], r["grad_scale"]) for r in a] == [
        (r["step"], r["skipped"], r["grad_scale"]) for r in b
    ]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), x["step"]
    final_a, final_b = (
        checkpoint_state(whole / "checkpoints" / "final"),
        checkpoint_state(resumed / "checkpoints" / "final"),
    )
    assert final_a["grad_scaler"] == final_b["grad_scaler"]
    weights_a = load_checkpoint(whole / "checkpoints" / "final")[0].state_dict()
    weights_b = load_checkpoint(resumed / "checkpoints" / "final")[0].state_dict()
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=1e-5, atol=1e-6, msg=name)


# -- data position, extending a finished run, progress (issue 16) ----------------------------------
def test_estimating_the_normalisation_does_not_advance_the_recorded_data_position(dataset, tmp_path):
    bare = tmp_path / "no-stats"  # a dataset without statistics: the trainer estimates them
    shutil.copytree(dataset, bare)
    manifest = json.loads((bare / "manifest.json").read_text())
    (bare / "manifest.json").write_text(json.dumps({**manifest, "stats": {}}))
    run = train(bare, tmp_path / "run", "tokens=1280", "checkpoint_every=5", "norm_batches=3")
    assert checkpoint_state(run / "checkpoints" / "step-00000005")["readers"] == [5 * 128]
    assert checkpoint_state(run / "checkpoints" / "final")["readers"] == [10 * 128]


CONSTANT = ["optim.lr_schedule=constant", "optim.lr_warmup_fraction=0", "sparsity=constant", "optim.lr=1e-3"]


def test_a_finished_run_trains_longer_like_a_run_planned_that_long(dataset, tmp_path):
    """Constant schedules: `clt train resume=RUN tokens=<more>` on a run that finished with no
    intermediate checkpoint continues the same data stream, optimizer and RNG, so its loss curve
    and final weights equal those of one run of the larger budget."""
    short = train(dataset, tmp_path / "short", *CONSTANT, "tokens=1280")
    assert not list((short / "checkpoints").glob("step-*"))
    longer = train(dataset, tmp_path / "long", *CONSTANT, "tokens=2560")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "clt_forge", "train", f"resume={short}", "tokens=2560", "threads=1"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "final" in result.stdout
    a, b = train_records(longer), train_records(short)
    assert [r["step"] for r in b] == list(range(20))
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), x["step"]
    _, _, info = load_checkpoint(short / "checkpoints" / "final")
    assert (info.step, info.tokens) == (20, 2560)
    weights_a = load_checkpoint(longer / "checkpoints" / "final")[0].state_dict()
    weights_b = load_checkpoint(short / "checkpoints" / "final")[0].state_dict()
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_extended_schedules_follow_the_longer_plan(dataset, tmp_path, capsys):
    """Warm-up schedules are functions of step / total steps: after `tokens=` grows, the resumed
    steps use the schedule values of a run planned for the larger budget (documented in README)."""
    warm = ["optim.lr_warmup_fraction=0.5", "sparsity.warmup_fraction=1.0", "optim.lr=1e-3"]
    short = train(dataset, tmp_path / "short", *warm, "tokens=1280")
    with pytest.raises(CLTError, match=r"already trained 1280 tokens.*pass tokens=N with N > 1280"):
        train(dataset, short, *warm, "tokens=1280", f"resume={short}")
    capsys.readouterr()
    train(dataset, short, *warm, "tokens=2560", f"resume={short}")
    assert "now 20 (tokens=2560)" in capsys.readouterr().out
    longer = train(dataset, tmp_path / "long", *warm, "tokens=2560")
    plan = {r["step"]: (r["lr"], r["l0_coefficient"]) for r in train_records(longer)}
    extended = {r["step"]: (r["lr"], r["l0_coefficient"]) for r in train_records(short)}
    assert all(extended[s] == pytest.approx(plan[s]) for s in range(10, 20))
    assert extended[9][1] == pytest.approx(2.0 * 9 / 10) and extended[10][1] == pytest.approx(2.0 * 10 / 20)


def test_progress_outside_a_terminal_prints_steady_lines(dataset, tmp_path, capsys):
    assert isinstance(progress_bar(total=1, file=io.StringIO()), LineProgress)  # StringIO: not a TTY
    now = [0.0]
    stream = io.StringIO()
    bar = LineProgress(
        10_000, desc="clt cache", unit="tok", unit_scale=True, file=stream, interval=10, clock=lambda: now[0]
    )
    for _ in range(10):
        now[0] += 3.0
        bar.update(1000)
        bar.set_postfix(loss="0.5")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 + 2 + 1, lines  # at the start, at 12 s and 24 s (interval 10 s), at close
    assert lines[1].startswith("clt cache: 4.00k/10.0k tok (40.0%), 333 tok/s, elapsed 00:12, ETA 00:18")
    assert lines[-1] == "clt cache: 10.0k/10.0k tok (100.0%), 333 tok/s, elapsed 00:30, ETA 00:00, loss=0.5"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert not isinstance(progress_bar(total=1, file=Terminal()), LineProgress)  # tqdm's bar there
    train(dataset, tmp_path / "run", "tokens=256")  # pytest's captured stderr is not a TTY
    err = capsys.readouterr().err
    assert "clt train: 0/256 tok (0.0%)" in err and "clt train: 256/256 tok (100.0%)" in err
