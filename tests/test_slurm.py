"""The SLURM side against a real single-node SLURM cluster on localhost (scripts/slurm/local_cluster.sh):
the cache array job, 2-process CPU training through both torchrun templates (ddp and feature
sharding), a Hydra multirun sweep through hydra-submitit-launcher (hydra/launcher=slurm), and
`sbatch --test-only` of the GPU templates.

Needs root and Debian's slurmctld, slurmd, slurm-client and munge: `bash scripts/ci/slurm.sh`.
Without them every test here fails (never skips) and says so. Jobs are tiny (model=tiny, a few
thousand tokens, one thread per process); the whole file takes about two minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from clt_forge.artifacts.activations import MANIFEST, read_chunk, read_manifest
from clt_forge.artifacts.checkpoint import TRAINING_STATE
from clt_forge.config.compose import compose_stage
from clt_forge.data import token_windows
from clt_forge.data.store import ActivationsStore
from clt_forge.training import load_checkpoint
from clt_forge.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "scripts" / "slurm"
PARTITION = "clt-test"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

# 100 windows of 31 stored tokens (BOS dropped), 10 windows per chunk: 5 chunks per shard of 2.
CONTEXT, WINDOWS = 32, 100
CACHE = ["model=tiny", f"data.context_size={CONTEXT}", f"tokens={WINDOWS * (CONTEXT - 1)}", "chunk_tokens=310"]
CACHE += ["held_out_tokens=310"]
TRAIN = ["model=tiny", "clt.d_features=32", "tokens=2560", "batch_size=128", "log_every=1", "eval_every=10"]
STEPS = 2560 // 128


@dataclass
class Cluster:
    state: Path
    env: dict[str, str]
    cpus: int

    def run(self, *args: str | Path, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(a) for a in args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def sbatch(self, *args: str | Path, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            ["sbatch", "--parsable", "--time=10", *map(str, args)],
            env={**self.env, **(env or {})},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"sbatch refused the job:\n{result.stderr}"
        return result.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` records of a job (every task of an array), as key -> value."""
        out = self.run("scontrol", "--oneliner", "show", "job", job_id).stdout
        return [dict(re.findall(r"(\S+?)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float, logs: list[Path] | None = None) -> dict[str, str]:
        """Poll until every task of the job has ended; returns {array task id (or job id): JobState}."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.jobs(job_id)
            states = {task_id(r): r["JobState"] for r in records}
            if records and all(state in FINAL_STATES for state in states.values()):
                return states
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                pytest.fail(
                    f"job {job_id} did not finish in {timeout:.0f} s (states {states}); cancelled.\n{tails(logs)}"
                )
            time.sleep(0.5)


def task_id(record: dict[str, str]) -> str:
    """An array task's index, or a plain job's id."""
    task = record.get("ArrayTaskId", "N/A")
    return record["JobId"] if task == "N/A" else task


def tails(logs: list[Path] | None, lines: int = 40) -> str:
    shown = []
    for log in logs or []:
        text = log.read_text(errors="replace").splitlines()[-lines:] if log.is_file() else ["(no such file)"]
        shown.append(f"---- {log}\n" + "\n".join(text))
    return "\n".join(shown)


def clt_executable() -> Path:
    beside = Path(sys.executable).with_name("clt")
    found = beside if beside.is_file() else shutil.which("clt")
    if not found:
        pytest.fail(f"no `clt` executable beside {sys.executable} or on PATH: install clt-forge (scripts/setup.sh).")
    return Path(found)


def missing_tools() -> list[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [tool for tool in TOOLS if shutil.which(tool, path=path) is None]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real SLURM cluster (controller, one node = this machine) for the session; stopped at the end."""
    missing = missing_tools()
    if missing:
        pytest.fail(
            f"SLURM is not installed here (missing {', '.join(missing)}): run `bash scripts/ci/slurm.sh` as root "
            "first. tests/test_slurm.py starts a real single-node SLURM cluster and never skips."
        )
    if os.geteuid() != 0:
        pytest.fail("tests/test_slurm.py starts slurmctld and slurmd, which must run as root: run pytest as root.")
    state = tmp_path_factory.mktemp("slurm")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", ""), "/usr/sbin", "/sbin"])
    env |= {
        "SLURM_CONF": str(state / "slurm.conf"),
        "LOCAL_CLUSTER_PARTITION": PARTITION,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # the templates' executables: this test's environment, whatever the checkout's layout
        "PYTHON": sys.executable,
        "CLT": str(clt_executable()),
    }
    script = ["bash", str(SLURM / "local_cluster.sh")]
    # A CI time-out's SIGTERM would end pytest without teardown and leave the daemons running:
    # turn it into KeyboardInterrupt, which pytest answers by tearing the fixtures down.
    previous = (
        signal.signal(signal.SIGTERM, interrupt) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        started = subprocess.run([*script, "start", str(state)], env=env, capture_output=True, text=True, timeout=120)
        if started.returncode != 0:
            pytest.fail(f"the local SLURM cluster did not start:\n{started.stdout}\n{started.stderr}")
        cpus = int(re.search(r"CPUs=(\d+)", (state / "slurm.conf").read_text()).group(1))  # type: ignore[union-attr]
        yield Cluster(state, env, cpus)
    finally:  # also after a failed or interrupted start: stop whatever has a pid file
        subprocess.run([*script, "stop", str(state)], env=env, capture_output=True, timeout=120)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}: stopping the local SLURM cluster")


# -- sbatch --test-only of the GPU templates -------------------------------------------------------------------


@pytest.mark.parametrize("template", ["train_1node.sbatch", "train_multinode.sbatch"])
def test_gpu_templates_are_accepted_by_sbatch_test_only(slurm, template):
    path = SLURM / template
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    header = [line.split()[1] for line in path.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--gpus-per-node=8" in header and "--ntasks-per-node=1" in header  # one torchrun per node, 8 GPUs
    # This node has no GPUs and fewer CPUs: ask for what it has; every other directive is the template's.
    fits = ["--gpus-per-node=0", f"--cpus-per-task={slurm.cpus}", "--nodes=1"]
    result = slurm.run("sbatch", "--test-only", *fits, path, "sharding=feature", check=False)
    assert result.returncode == 0 and re.search(
        rf"to start at .* on nodes \S+ in partition {PARTITION}", result.stderr
    ), result.stderr
    assert not slurm.run("squeue", "-h", "--name=clt-train,clt-train-multi").stdout.strip()  # nothing was queued


# -- cache array job ---------------------------------------------------------------------------------------------


@dataclass
class CacheRun:
    out: Path
    job: str
    states: dict[str, str]
    logs: list[Path]


@pytest.fixture(scope="module")
def cache_job(slurm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm-cache")
    out = folder / "acts"
    job = slurm.sbatch(
        "--array=0-1",
        "--cpus-per-task=1",  # both shards at once on this 2-CPU node
        f"--output={folder}/cache-%A_%a.out",
        SLURM / "cache_array.sbatch",
        *CACHE,
        f"out={out}",
        f"runs={folder / 'runs'}",
    )
    logs = [folder / f"cache-{job}_{task}.out" for task in (0, 1)]
    states = slurm.wait(job, timeout=240, logs=logs)
    return CacheRun(out, job, states, logs)


def test_cache_array_job_writes_one_merged_dataset(cache_job, tiny_model):
    out = cache_job.out
    assert cache_job.states == {"0": "COMPLETED", "1": "COMPLETED"}, tails(cache_job.logs)
    for task, log in enumerate(cache_job.logs):
        assert f"shard {task} of 2" in log.read_text()
    assert sum("activation dataset: " in log.read_text() for log in cache_job.logs) >= 1  # the merging shard says so
    manifest = read_manifest(out)
    assert (manifest.model, manifest.shard_count, manifest.n_tokens) == ("tiny", 2, WINDOWS * (CONTEXT - 1))
    assert (manifest.n_layers, manifest.d_model, manifest.split) == (3, 64, "train")
    assert {entry.path.split("-")[0] for entry in manifest.chunks} == {"chunks/s00000", "chunks/s00001"}
    chunks = [read_chunk(out, entry, manifest.quant_spec) for entry in manifest.chunks]  # checksums verified
    assert [c.tokens.numel() for c in chunks] == [entry.n_tokens for entry in manifest.chunks]
    # The two shards together hold exactly the first 100 windows of the text, each once.
    cfg = OmegaConf.to_object(compose_stage("cache", [*CACHE, f"out={out}"]))
    windows = torch.stack(list(token_windows(cfg.data, tiny_model.tokenizer))[:WINDOWS])[:, 1:]
    cached = torch.cat([c.tokens for c in chunks]).reshape(-1, CONTEXT - 1)
    assert sorted(map(tuple, cached.tolist())) == sorted(map(tuple, windows.tolist()))
    held_out = read_manifest(out / "held_out")
    assert held_out.split == "held_out" and held_out.n_tokens == 310
    batch = next(iter(ActivationsStore.from_cache(out, 64)))
    assert batch.mlp_in.shape == (64, 3, 64) and batch.mlp_out.shape == (64, 3, 64)
    assert torch.isfinite(batch.mlp_in).all() and torch.isfinite(batch.mlp_out).all()
    assert all(json.loads(p.read_text())["complete"] for p in (out / "parts").glob("shard-*.json"))
    assert (out / MANIFEST).is_file() and not list(out.rglob(".*"))  # no temporaries left behind


# -- 2-process CPU training through the torchrun templates --------------------------------------------------------


@dataclass
class TrainRun:
    out: Path
    job: str
    state: str
    log: Path


@pytest.fixture(scope="module")
def train_jobs(slurm, cache_job, tmp_path_factory):
    """sharding=ddp through train_1node.sbatch and sharding=feature through train_multinode.sbatch
    (one node: srun + torchrun's c10d rendezvous), 2 gloo processes each, submitted together."""
    assert cache_job.states == {"0": "COMPLETED", "1": "COMPLETED"}, tails(cache_job.logs)
    folder = tmp_path_factory.mktemp("slurm-train")
    submitted = {}
    for mode, template, extra in (
        ("ddp", "train_1node.sbatch", []),
        ("feature", "train_multinode.sbatch", ["--nodes=1"]),
    ):
        out = folder / mode
        job = slurm.sbatch(
            *extra,
            "--gpus-per-node=0",
            "--cpus-per-task=2",
            f"--output={folder}/{mode}-%j.out",
            SLURM / template,
            *TRAIN,
            f"sharding={mode}",
            f"activations={cache_job.out}",
            f"out={out}",
            f"runs={folder / 'runs'}",
            env={"NPROC_PER_NODE": "2"},
        )
        submitted[mode] = (out, job, folder / f"{mode}-{job}.out")
    runs = {}
    for mode, (out, job, log) in submitted.items():
        states = slurm.wait(job, timeout=420, logs=[log])
        runs[mode] = TrainRun(out, job, states[job], log)
    return runs


def check_trained(run: TrainRun) -> tuple[dict, list[dict]]:
    log = run.log.read_text()
    assert "--nproc_per_node=2" in log.splitlines()[0], log  # the template started torchrun with 2 processes
    assert run.state == "COMPLETED", f"job {run.job} ended {run.state}:\n{tails([run.log], 60)}"
    final = run.out / "checkpoints" / "final"
    assert (final / "config.json").is_file()
    config = json.loads((final / "config.json").read_text())
    assert config["step"] == STEPS and config["tokens"] == 2560
    records = [r for r in read_metrics(run.out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(STEPS))  # written once (by rank 0), not once per rank
    assert all(math.isfinite(r["loss"]) for r in records)
    clt, norm, info = load_checkpoint(final)
    assert norm.in_scale.shape == (3,) and torch.all(norm.in_scale > 0)
    assert (info.n_layers, info.d_model, info.d_features, info.step) == (3, 64, 32, STEPS)
    assert all(torch.isfinite(p).all() for p in clt.parameters())
    return config, records


def test_ddp_training_job_on_two_cpu_processes(train_jobs):
    run = train_jobs["ddp"]
    config, _ = check_trained(run)
    assert not config.get("shards")  # DDP: one full copy, one weights file
    assert (run.out / "checkpoints" / "final" / "clt.safetensors").is_file()
    state = torch.load(run.out / "checkpoints" / "final" / TRAINING_STATE, weights_only=False)
    assert state["data_world"] == 2 and sum(state["readers"]) == 2560  # two ranks read disjoint halves
    assert state["readers"] == [1280, 1280]


def test_feature_sharded_training_job_on_two_cpu_processes(train_jobs):
    run = train_jobs["feature"]
    assert "rendezvous " in run.log.read_text().splitlines()[0]  # the multi-node template's c10d path
    config, _ = check_trained(run)
    final = run.out / "checkpoints" / "final"
    assert sorted(p.name for p in final.glob("clt*.safetensors")) == [
        "clt.shard-000-of-002.safetensors",
        "clt.shard-001-of-002.safetensors",
    ]
    assert config["shards"]["world"] == 2 and config["shards"]["slices"] == [[0, 16], [16, 32]]
    clt, _, _ = load_checkpoint(final)  # merged into the full CLT: rank r's features are columns 16r..16r+15
    assert clt.W_enc.shape == (3, 64, 32) and clt.W_dec.shape[0] == 32
    for rank in range(2):
        shard = load_file(final / f"clt.shard-{rank:03d}-of-002.safetensors")
        features = slice(16 * rank, 16 * (rank + 1))
        assert torch.equal(shard["W_enc"], clt.W_enc.detach()[:, :, features])
        assert torch.equal(shard["W_dec"], clt.W_dec.detach()[features])
        assert torch.equal(shard["b_dec"], clt.b_dec.detach())  # replicated


# -- Hydra multirun sweep through hydra-submitit-launcher --------------------------------------------------------


def test_hydra_multirun_sweep_runs_each_job_on_slurm(slurm, cache_job, tmp_path):
    assert cache_job.states == {"0": "COMPLETED", "1": "COMPLETED"}, tails(cache_job.logs)
    clt = Path(slurm.env["CLT"])
    args = [clt, "train", "-m", "hydra/launcher=slurm", f"hydra.launcher.partition={PARTITION}"]
    args += ["sparsity.l0_coefficient=1,3", *TRAIN, f"activations={cache_job.out}", f"runs={tmp_path}"]
    log = tmp_path / "multirun.log"
    with log.open("w") as sink:
        try:  # returns only once both jobs have written their results
            proc = subprocess.run(
                list(map(str, args)), env=slurm.env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, timeout=420
            )
        except subprocess.TimeoutExpired:
            slurm.run("scancel", "--user=root", check=False)
            pytest.fail(f"`clt train -m hydra/launcher=slurm` did not return in 420 s:\n{tails([log], 60)}")
    assert proc.returncode == 0, tails([log], 80)
    (sweep,) = (tmp_path / "train-multirun").iterdir()
    # Both jobs' outputs are complete when the command returns.
    for number, coefficient in enumerate((1.0, 3.0)):
        run = sweep / str(number)
        recorded = json.loads((run / "train_config.json").read_text())
        assert recorded["sparsity"]["l0_coefficient"] == coefficient and recorded["sharding"]["mode"] == "single"
        records = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
        assert [r["step"] for r in records] == list(range(STEPS))
        _, _, info = load_checkpoint(run / "checkpoints" / "final")
        assert (info.d_features, info.step) == (32, STEPS)
    # ... and they ran as one SLURM array job with the launcher config's resources.
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    arrays = {name.split("_")[0] for name in tasks}
    assert len(tasks) == 2 and len(arrays) == 1, tasks
    (array,) = arrays
    states = slurm.wait(array, timeout=60)  # the job itself ends a moment after its result is written
    assert states == {"0": "COMPLETED", "1": "COMPLETED"}
    for record in slurm.jobs(array):
        assert record["Partition"] == PARTITION and record["TimeLimit"] == "01:00:00"
        assert record["NumCPUs"] == "2" and "gpu" not in record.get("TRES", "")
