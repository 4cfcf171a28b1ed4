"""`clt demo` on the tiny model: every stage writes into one run folder, the graph's feature
nodes carry the tokens explainer's labels, a re-run skips every finished stage, and each
stage runs alone from the artifacts the demo wrote."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from clt_forge.artifacts.graph import parse_node
from clt_forge.config.compose import compose_stage, validate
from clt_forge.config.overrides import quote_text_values
from clt_forge.stages.demo import shell_quote, step_override

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "model=tiny",
    "cache_tokens=4096",
    "train_tokens=4096",
    "batch_size=128",
    "autointerp_tokens=2048",
    "max_feature_nodes=16",
    "clt.d_features=32",
    "explainer.max_new_tokens=12",
    "threads=2",
    "eval_windows=4",
]


def clt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-m", "clt_forge", *args], capture_output=True, text=True, cwd=cwd, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "Traceback" not in done.stderr
    return done


def test_demo_runs_every_stage_labels_the_graph_and_skips_finished_stages(tmp_path):
    out = tmp_path / "demo"
    first = clt("demo", *SMALL, f"out={out}", cwd=tmp_path)
    for n, stage in enumerate(["cache", "train", "attribute", "autointerp"], start=1):
        assert f"[{n}/6] {stage}: " in first.stdout and "already done" not in first.stdout
    assert (out / "activations" / "manifest.json").is_file()
    assert (out / "activations" / "held_out" / "manifest.json").is_file()
    assert (out / "clt" / "checkpoints" / "final" / "config.json").is_file()
    assert (out / "features" / "features.db").is_file() and (out / "features" / "summary.json").is_file()
    graph = json.loads((out / "graphs" / "opposite.json").read_text())
    assert graph["metadata"]["prompt"].endswith('The opposite of "large" is "')
    assert graph["metadata"]["features"] == str((out / "features" / "features.db").resolve())
    features = [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    labelled = [n for n in features if n["clerp"].strip()]
    assert features and len(labelled) == len(features), "every feature node has its explanation"
    summary = json.loads((out / "features" / "summary.json").read_text())
    assert summary["features"] == len({parse_node(n).layer_pos_feature[::2] for n in features})
    assert f"serve {out / 'graphs' / 'opposite.json'}" in first.stdout
    quality = json.loads((out / "quality.json").read_text())
    assert quality["graphs"]["opposite"]["replacement"] == graph["metadata"]["replacement_score"]
    assert 0 <= quality["replacement"]["top1"] <= 1 and quality["replacement"]["kl"] >= 0
    assert quality["replacement"]["positions"] == 4 * (128 - 1)  # eval_windows=4 of context 128
    assert quality["held_out"]["ev_mean"] <= 1 and quality["held_out"]["l0_mean"] > 0
    assert "replacement model (every MLP replaced): KL" in first.stdout

    again = clt("demo", *SMALL, f"out={out}", cwd=tmp_path)
    assert again.stdout.count("already done, skipped") == 4
    assert f"{len(labelled)} feature nodes" in again.stdout

    # each stage alone, from the artifacts of the stages before (the commands the demo printed)
    lines = [line for line in first.stdout.splitlines() if line.startswith("[3/6] attribute: ")]
    assert lines and "checkpoint=" in lines[0] and "prompt=" in lines[0]
    alone = clt(
        "attribute",
        f"checkpoint={out / 'clt' / 'checkpoints' / 'final'}",
        f"features={out / 'features' / 'features.db'}",
        f"out={tmp_path / 'graphs'}",
        "prompt=The cat sat",
        "max_feature_nodes=16",
        cwd=tmp_path,
    )
    assert "graph written to" in alone.stdout
    relabelled = json.loads((tmp_path / "graphs" / "the-cat-sat.json").read_text())
    assert relabelled["metadata"]["features"] == graph["metadata"]["features"]


# values the demo prints in its step commands: paths, numbers, and prompts with backslashes and quotes
STEP_VALUES = [
    'The opposite of "large" is "',
    "back\\slash \\' and \\\" quotes\\",
    "It's a\\b, c=[d] \\",
    "\\\\server\\share's",
    "true",
    "12",
    Path("/tmp/run dir/activations"),
    65_536,
    2e-3,
    True,
]


@pytest.mark.parametrize("value", STEP_VALUES, ids=repr)
def test_printed_step_overrides_round_trip_exactly(value):
    """A word of a printed step command is, after the shell, an override Hydra parses back to the value."""
    (word,) = shlex.split(shell_quote(step_override("prompt", value)))
    parsed = OverridesParser.create().parse_override(word).value()
    meant = str(value) if isinstance(value, Path) else value
    assert parsed == meant and type(parsed) is type(meant)
    if isinstance(value, str):  # what `clt attribute <word>` composes
        (override,) = quote_text_values([word])
        assert compose_stage("attribute", [override]).prompt == value


@pytest.mark.parametrize("schedule", ["constant", "linear_warmup", "delayed_linear"])
def test_the_demo_takes_every_sparsity_schedule(schedule):
    validate("demo", [f"sparsity={schedule}"])
    sparsity = compose_stage("demo", [f"sparsity={schedule}"]).sparsity
    assert sparsity.schedule == schedule
    assert sparsity.l0_coefficient == 0.3, "conf/demo.yaml sets the demo's lambda0 whatever the schedule"
    assert ("warmup_fraction" in sparsity) == (schedule == "linear_warmup")


def test_the_demo_default_warms_up_over_half_the_run_unless_told_otherwise():
    assert compose_stage("demo", []).sparsity.warmup_fraction == 0.5
    assert compose_stage("demo", ["sparsity.warmup_fraction=1.0"]).sparsity.warmup_fraction == 1.0


def test_clt_demo_with_constant_sparsity_prints_its_config():
    done = subprocess.run(
        [sys.executable, "-m", "clt_forge", "demo", "sparsity=constant", "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "schedule: constant" in done.stdout and "warmup_fraction" not in done.stdout
