"""The `clt` command: stages, config groups, composition, and start-up errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from clt_forge.cli import app
from clt_forge.config.compose import GROUPS, all_groups, group_options

REPO = Path(__file__).resolve().parents[1]
STAGES = ["cache", "train", "autointerp", "attribute", "serve"]
runner = CliRunner()


def clt(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real console script in a fresh process."""
    return subprocess.run([str(Path(sys.executable).parent / "clt"), *args], capture_output=True, text=True, cwd=REPO)


def test_help_lists_the_five_stages():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for stage in STAGES:
        assert stage in result.output


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help_lists_groups_and_options(stage):
    result = runner.invoke(app, [stage, "--help"], terminal_width=200)
    assert result.exit_code == 0
    for group, options in all_groups().items():
        assert f"{group}: {', '.join(options)}" in result.output


def test_every_design_group_option_exists():
    assert set(GROUPS) == {"model", "data", "quant", "sharding", "sparsity", "clt", "logger", "explainer"}
    assert {"smollm2_135m", "gpt2", "llama1b", "gemma2_2b", "tiny"} <= set(group_options("model"))
    assert {"bundled", "hf", "files"} <= set(group_options("data"))
    assert {"none", "fp16", "int8", "int4", "int2"} <= set(group_options("quant"))
    assert set(group_options("sharding")) == {"single", "ddp", "fsdp", "feature"}
    assert {"constant", "linear_warmup", "delayed_linear"} <= set(group_options("sparsity"))
    assert {"none", "wandb"} <= set(group_options("logger"))
    assert set(group_options("explainer")) == {"local", "openai", "none", "tokens"}  # tokens: issue 19
    assert {"basic", "slurm"} <= set(group_options("hydra/launcher"))


def test_cfg_job_prints_the_composed_config():
    result = clt("cache", "--cfg", "job", "model=gpt2", "quant=int8", "sharding=feature")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["model"]["hf_name"] == "gpt2"
    assert cfg["model"]["d_model"] == 768
    assert cfg["quant"]["scheme"] == "int8"
    assert cfg["sharding"]["mode"] == "feature"


@pytest.mark.parametrize(
    ("stage", "keys"),
    [
        ("cache", {"out", "tokens"}),
        ("train", {"out", "tokens", "activations"}),
        ("autointerp", {"out", "tokens", "activations", "checkpoint"}),
        ("attribute", {"out", "checkpoint", "features", "prompt"}),
        ("serve", {"out", "checkpoint", "features"}),
    ],
)
def test_common_override_names_exist(stage, keys):
    result = runner.invoke(app, [stage, "--cfg", "job"])
    assert result.exit_code == 0, result.output
    assert keys <= set(yaml.safe_load(result.output))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=nope"], ["model", "'nope'", "gpt2", "smollm2_135m", "tiny"]),
        (["quant=int9"], ["quant", "'int9'", "int8", "int4", "int2", "none", "fp16"]),
        (["tokens=many"], ["tokens", "'many'", "Integer"]),
        (["quant.granularity=pixel"], ["quant.granularity", "'pixel'", "layer", "row", "group"]),
        (["no_such_key=1"], ["no_such_key", "Keys allowed", "tokens", "model"]),
        (["model.no_such_key=1"], ["model.no_such_key", "d_model"]),
    ],
)
def test_bad_config_exits_2_naming_key_and_allowed_values(args, expected):
    result = clt("cache", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    for text in expected:
        assert text in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one paragraph


def test_multirun_cfg_composes_every_job():
    result = clt("train", "-m", "sparsity=constant,linear_warmup", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    jobs = [yaml.safe_load(part) for part in result.stdout.split("# job ")[1:]]
    assert [job["sparsity"]["schedule"] for job in jobs] == ["constant", "linear_warmup"]


def test_multirun_validates_every_job():
    result = clt("train", "-m", "sparsity=constant,bogus")
    assert result.returncode == 2
    assert "bogus" in result.stderr and "delayed_linear" in result.stderr


def test_python_m_behaves_like_clt():
    args = ["cache", "--cfg", "job", "quant=int4"]
    via_module = subprocess.run([sys.executable, "-m", "clt_forge", *args], capture_output=True, text=True, cwd=REPO)
    assert via_module.returncode == 0, via_module.stderr
    assert via_module.stdout == clt(*args).stdout


def test_run_directory_names_stage_and_time(tmp_path):
    result = clt("serve", "--cfg", "hydra", f"runs={tmp_path}")
    assert result.returncode == 0, result.stderr
    run_dir = yaml.safe_load(result.stdout)["hydra"]["run"]["dir"]
    assert run_dir.startswith("${runs}/${hydra.job.name}/${now:")


def test_multirun_really_runs_every_job_in_its_own_sweep_folder(tmp_path):
    """A real Hydra multirun (the basic launcher): one run folder per job under <runs>/<stage>-multirun/."""
    result = clt(
        "train",
        "-m",
        "model=tiny",
        "sparsity.l0_coefficient=1,3",
        "data.source=model",
        "data.context_size=32",
        "tokens=128",
        "batch_size=64",
        "clt.d_features=16",
        "eval_every=1",
        "threads=1",
        f"runs={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    (sweep,) = (tmp_path / "train-multirun").iterdir()
    for job, coefficient in (("0", 1.0), ("1", 3.0)):
        config = yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())
        assert config["sparsity"]["l0_coefficient"] == coefficient
        assert (sweep / job / "checkpoints" / "final" / "clt.safetensors").is_file()


def test_finetune_from_is_an_alias_of_finetune_source():
    result = runner.invoke(app, ["train", "--cfg", "job", "finetune.from=/ckpt", "finetune.rank=4"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["finetune"] == {"source": "/ckpt", "rank": 4}


@pytest.mark.parametrize(("given", "expected"), [(None, "1"), ("0", "0")])
def test_importing_clt_forge_asks_torch_for_huge_pages_unless_told_not_to(given, expected):
    """THP_MEM_ALLOC_ENABLE is set before torch's first allocation (docs/performance.md, "Huge
    pages"), and a user's own value is kept."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    code = "import os, clt_forge, torch; torch.zeros(1); print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == expected
