"""Multi-process training under real torch.distributed (gloo on CPU): feature sharding's building
blocks; for sharding=feature, ddp and fsdp, the runner's training steps (loss terms, every
parameter's gradient, final weights) equal the single-process run on the same global batches;
sharded checkpoints load as the full CLT and reshard exactly; `torchrun ... clt train` resumes
exactly at the same world size and continues at another one."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from gloo import free_port, spawn_ranks

from clt_forge.artifacts.checkpoint import CheckpointInfo
from clt_forge.artifacts.normalization import Normalization
from clt_forge.clt.loss import clt_loss
from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.distributed.feature_sharding import FeatureShardedCLT, feature_slice, shard_clt

L, D, F, B = 3, 16, 10, 32
COEFFICIENTS = {"l0_coefficient": 0.3, "c": 2.0, "dead_coefficient": 0.01}


def full_clt(skip: bool = False) -> CrossLayerTranscoder:
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(L, D, F, jumprelu_threshold=0.05, skip=skip)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.1)
        clt.b_dec.normal_(0, 0.1)
        if clt.W_skip is not None:
            clt.W_skip.normal_(0, 0.1)
    return clt


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(B, L, D, generator=generator), torch.randn(B, L, D, generator=generator)


def _grads_rank(rank: int, world: int, skip: bool) -> None:
    x, y = batch()
    reference = full_clt(skip)
    out = reference(x)
    terms = clt_loss(out, y, out.decoder_norms, reference.jumprelu_threshold(), **COEFFICIENTS)
    terms.total.backward()
    reference_norm = torch.sqrt(sum(p.grad.double().square().sum() for p in reference.parameters()))

    sharded = FeatureShardedCLT(shard_clt(full_clt(skip), rank, world))
    local_terms, logged = sharded.loss(sharded(x), y, **COEFFICIENTS)
    local_terms.total.backward()
    for name in ("total", "mse", "sparsity", "dead"):
        torch.testing.assert_close(getattr(logged, name), getattr(terms, name).detach(), rtol=1e-5, atol=1e-6)
    cols = feature_slice(F, rank, world)
    grads = {n: p.grad for n, p in sharded.local.named_parameters()}
    expected = {n: p.grad for n, p in reference.named_parameters()}
    torch.testing.assert_close(grads["W_enc"], expected["W_enc"][:, :, cols], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["b_enc"], expected["b_enc"][:, cols], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["log_threshold"], expected["log_threshold"][:, cols], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["W_dec"], expected["W_dec"][cols], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["b_dec"], expected["b_dec"], rtol=1e-5, atol=1e-6)
    if skip:  # replicated like b_dec: the full gradient on every rank
        torch.testing.assert_close(grads["W_skip"], expected["W_skip"], rtol=1e-5, atol=1e-6)
    else:
        assert "W_skip" not in grads
    norm = sharded.clip_grad_norm_(max_norm=1e-3)
    torch.testing.assert_close(norm.double(), reference_norm, rtol=1e-5, atol=1e-6)
    clipped = torch.sqrt(sum(g.double().square().sum() for g in grads.values() if g is not None))
    assert clipped < 1e-3, "clipping scales by the global norm, not each rank's"


@pytest.mark.parametrize(("world", "skip"), [(2, False), (3, False), (2, True)])
def test_feature_sharded_gradients_equal_the_single_process_ones(world, skip):
    spawn_ranks(_grads_rank, world, skip)


def test_feature_slices_cover_every_feature_once():
    for d_features in (1, 7, 10, 1152):
        for world in (1, 2, 3, 8):
            covered = [i for rank in range(world) for i in range(d_features)[feature_slice(d_features, rank, world)]]
            assert covered == list(range(d_features))


def _checkpoint_rank(rank: int, world: int, folder: str) -> None:
    from pathlib import Path

    from clt_forge.artifacts.checkpoint import CheckpointInfo
    from clt_forge.artifacts.normalization import Normalization
    from clt_forge.distributed.checkpoint import save_sharded_checkpoint

    local = shard_clt(full_clt(), rank, world)
    norm = Normalization(torch.arange(1, L + 1).float(), torch.arange(2, L + 2).float())
    info = CheckpointInfo(n_layers=L, d_model=D, d_features=F, bandwidth=1.0, model={"name": "test"}, hooks={})
    save_sharded_checkpoint(Path(folder), local, norm, info)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_checkpoint_loads_as_the_full_clt_and_reshards(world, tmp_path):
    from clt_forge.artifacts.checkpoint import load_checkpoint

    folder = tmp_path / "ckpt"
    spawn_ranks(_checkpoint_rank, world, str(folder))
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("clt.shard-")) == [
        f"clt.shard-{r:03d}-of-{world:03d}.safetensors" for r in range(world)
    ]
    assert not list(tmp_path.glob(".ckpt-*")), "no temporary folder left behind"
    merged, norm, info = load_checkpoint(folder)
    reference = full_clt()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert info.shards is not None and info.shards["world"] == world
    torch.testing.assert_close(norm.out_scale, torch.arange(2, L + 2).float())
    for other_world in (1, 2, 4):  # resume at any world size: re-slice the merged CLT
        pieces = [shard_clt(merged, rank, other_world) for rank in range(other_world)]
        torch.testing.assert_close(torch.cat([p.W_dec for p in pieces]), reference.W_dec, rtol=0, atol=0)


def test_device_follows_the_local_rank_and_backend_the_device():
    from clt_forge.distributed.setup import dist_env

    second_node = {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    env = dist_env(second_node, cuda=True)
    assert (env.rank, env.world_size, env.device, env.backend) == (9, 16, torch.device("cuda:1"), "nccl")
    cpu = dist_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}, cuda=False)
    assert (cpu.rank, cpu.world_size, cpu.device, cpu.backend, cpu.main) == (3, 4, torch.device("cpu"), "gloo", False)
    single = dist_env({}, cuda=False)
    assert not single.distributed and single.main
    assert dist_env({}, backend="gloo", cuda=True).backend == "gloo"


# -- the runner under each sharding mode vs one process ------------------------------------------
STEPS, GLOBAL_BATCH = 4, 64


def runner_config(mode: str, out: str, *extra: str):
    from omegaconf import OmegaConf

    from clt_forge.config.compose import compose_stage

    overrides = ["model=tiny", "clt.d_features=40", f"batch_size={GLOBAL_BATCH}", f"sharding={mode}", f"out={out}"]
    overrides += ["sparsity.l0_coefficient=0.5", "sparsity.dead_coefficient=0.01", "optim.grad_clip=0.5", "threads=1"]
    return OmegaConf.to_object(compose_stage("train", [*overrides, *extra]))


def global_batches(n_layers: int, d_model: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(GLOBAL_BATCH, n_layers, d_model, generator=generator) * 1.5,
            torch.randn(GLOBAL_BATCH, n_layers, d_model, generator=generator),
        )
        for _ in range(STEPS)
    ]


SILENCED = {(0, 3), (1, 17), (1, 30), (2, 39)}  # (layer, global feature) that can never fire


def stepped_runner(mode: str, out: str, rank: int, world: int, parallel=None, extra=(), silence=False):
    """A runner built like `run` does, then STEPS training steps on this rank's share of the batches.
    Returns (runner, per-step logged results, per-step full gradients on rank-held features).
    `silence`: the SILENCED features get an encoder bias no input overcomes."""
    from clt_forge.distributed.parallel import start_parallel
    from clt_forge.training.runner import CLTTrainingRunner

    runner = CLTTrainingRunner(runner_config(mode, out, *extra))
    runner.parallel = parallel or start_parallel(runner.cfg)
    runner.total_steps = STEPS
    runner.build_model()
    batches = global_batches(runner.cfg.model.n_layers, runner.cfg.model.d_model)
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    local = (lambda t: t) if mode in ("single", "feature") else (lambda t: t[share])
    runner.init_encoder_bias(local(batches[0][0]))
    if silence:
        with torch.no_grad():
            for layer, feature in SILENCED:
                if runner.features.start <= feature < runner.features.stop:
                    runner.clt.b_enc[layer, feature - runner.features.start] = -1e6
    runner.prepare()
    results, grads = [], []
    for step, (x, y) in enumerate(batches):
        results.append(runner.train_step(step, local(x), local(y)))
        full = {
            n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in runner.clt.named_parameters()
        }
        grads.append(full)
    return runner, results, grads


def single_reference(out: str, extra=()):
    from clt_forge.distributed.parallel import Parallel
    from clt_forge.distributed.setup import dist_env

    return stepped_runner("single", out, 0, 1, parallel=Parallel(dist_env({}, cuda=False)), extra=extra)


def mode_worker(rank: int, world: int, port: int, mode: str, out: str, extra=()) -> None:
    from dataclasses import asdict

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    reference, expected_results, expected_grads = single_reference(out, extra)
    runner, results, grads = stepped_runner(mode, out, rank, world, extra=extra)
    try:
        cols = runner.features
        for step in range(STEPS):
            got, want = asdict(results[step]), asdict(expected_results[step])
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (mode, step, key, got[key], want[key])
            for name, grad in expected_grads[step].items():
                if name in ("W_enc", "b_enc", "log_threshold", "W_dec"):
                    dim = {"W_enc": 2, "b_enc": 1, "log_threshold": 1, "W_dec": 0}[name]
                    grad = grad.narrow(dim, cols.start, cols.stop - cols.start)
                torch.testing.assert_close(
                    grads[step][name], grad, rtol=1e-4, atol=1e-6, msg=f"{mode} step {step} grad {name}"
                )
        weights = runner.parallel.full_tensors(dict(runner.clt.state_dict()))
        for name, value in reference.clt.state_dict().items():
            if name in ("W_enc", "b_enc", "log_threshold", "W_dec"):
                dim = {"W_enc": 2, "b_enc": 1, "log_threshold": 1, "W_dec": 0}[name]
                value = value.narrow(dim, cols.start, cols.stop - cols.start)
            torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=f"{mode} final {name}")
        if mode == "feature":
            assert cols.stop - cols.start == 20, "each of 2 ranks holds half the features"
    finally:
        runner.close()


@pytest.mark.parametrize(
    ("mode", "extra"),
    [("feature", ()), ("ddp", ()), ("fsdp", ()), ("feature", ("clt.skip=true",)), ("fsdp", ("clt.skip=true",))],
    ids=["feature", "ddp", "fsdp", "feature-skip", "fsdp-skip"],
)
def test_each_sharding_mode_trains_like_one_process(mode, extra, tmp_path):
    """Same global batches (ddp/fsdp: each rank half of them): per-step loss terms, L0, gradient
    norm, every parameter's gradient (after clipping by the global norm) and the final weights
    match the single-process runner; with a skip connection (replicated W_skip) too."""
    mp.spawn(mode_worker, args=(2, free_port(), mode, str(tmp_path), extra), nprocs=2, join=True)


def dead_worker(rank: int, world: int, port: int, mode: str, out: str) -> None:
    from clt_forge.distributed.parallel import Parallel
    from clt_forge.distributed.setup import dist_env

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    window = [f"dead_window_tokens={GLOBAL_BATCH * (STEPS - 1)}"]  # shorter than the run: counts are due
    single = Parallel(dist_env({}, cuda=False))
    reference, _, _ = stepped_runner("single", out, 0, 1, parallel=single, extra=window, silence=True)
    runner, _, _ = stepped_runner(mode, out, rank, world, extra=window, silence=True)
    try:
        expected = reference.dead.per_layer()
        dead = reference.dead.last_fired == 0  # never fired in the whole run
        assert {(int(layer), int(feature)) for layer, feature in dead.nonzero()} >= SILENCED
        assert expected == dead.sum(1).tolist()  # what never fired is exactly what is counted dead
        got = runner.parallel.sum_features(torch.tensor(runner.dead.per_layer())).tolist()
        assert got == expected, (mode, rank, got, expected)
        assert runner.dead.tokens == reference.dead.tokens == GLOBAL_BATCH * STEPS  # global tokens on every rank
    finally:
        runner.close()


@pytest.mark.parametrize("mode", ["feature", "ddp", "fsdp"])
def test_dead_features_are_counted_alike_in_every_sharding_mode(mode, tmp_path):
    """A feature silent for the whole window is dead; the per-layer counts of ddp/fsdp (fired
    reduced across data ranks) and feature sharding (counts summed over feature slices) equal one
    process's."""
    mp.spawn(dead_worker, args=(2, free_port(), mode, str(tmp_path)), nprocs=2, join=True)


# -- checkpoints: 2 ranks -> 1 -> 2 is lossless --------------------------------------------------
def full_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    shapes = {
        "W_enc": (L, D, F),
        "b_enc": (L, F),
        "log_threshold": (L, F),
        "W_dec": (F, L * (L + 1) // 2, D),
        "b_dec": (L, D),
    }
    weights = {n: torch.randn(shape, generator=generator) for n, shape in shapes.items()}
    state = {
        f"{kind}.{n}": torch.rand(shape, generator=generator)
        for kind in ("exp_avg", "exp_avg_sq")
        for n, shape in shapes.items()
    }
    state["dead.last_fired"] = torch.randint(0, 2**40, (L, F), generator=generator)
    return {**weights, **state}


def _reshard_rank(rank: int, world: int, source: str, folder: str) -> None:
    from pathlib import Path

    from clt_forge.artifacts.checkpoint import read_info, read_tensors
    from clt_forge.distributed.checkpoint import save_sharded_checkpoint

    cols = feature_slice(F, rank, world)
    if source:  # read this rank's slice of a checkpoint written at another world size
        info = read_info(source)
        weights = read_tensors(Path(source), "clt", info, cols)
        state = read_tensors(Path(source), "training_state", info, cols)
        # a slice of one file's tensor must come back contiguous: a strided W_enc view made a
        # 2-rank resume from a 1-process checkpoint train differently (test_torchrun)
        assert all(t.is_contiguous() for t in [*weights.values(), *state.values()])
        norm = Normalization.from_state(weights)
        weights = {k: v for k, v in weights.items() if not k.startswith("norm.")}
    else:
        full = full_state()
        dims = {"W_enc": 2, "b_enc": 1, "log_threshold": 1, "W_dec": 0, "dead.last_fired": 1}

        def mine(name, t):
            dim = dims.get(name.removeprefix("exp_avg_sq.").removeprefix("exp_avg."))
            return t if dim is None else t.narrow(dim, cols.start, cols.stop - cols.start)

        weights = {n: mine(n, t) for n, t in full.items() if "." not in n}
        state = {n: mine(n, t) for n, t in full.items() if "." in n}
        norm = Normalization(torch.arange(1, L + 1).float(), torch.arange(2, L + 2).float())
    info = CheckpointInfo(n_layers=L, d_model=D, d_features=F, bandwidth=1.0, model={"name": "test"}, hooks={})
    save_sharded_checkpoint(Path(folder), weights, norm, info, {"step": 3}, state)


def test_resharding_round_trip_two_one_two_is_exact(tmp_path):
    from clt_forge.artifacts.checkpoint import read_info, read_tensors, save_checkpoint

    two, one, back = tmp_path / "two", tmp_path / "one", tmp_path / "back"
    spawn_ranks(_reshard_rank, 2, "", str(two))
    info = read_info(two)
    weights, state = read_tensors(two, "clt", info), read_tensors(two, "training_state", info)
    expected = full_state()
    for name, value in {**weights, **state}.items():
        if not name.startswith("norm."):
            assert torch.equal(value, expected[name]), name
    plain = CheckpointInfo(n_layers=L, d_model=D, d_features=F, bandwidth=1.0, model={"name": "test"}, hooks={})
    norm = Normalization.from_state(weights)
    save_checkpoint(
        one, {k: v for k, v in weights.items() if not k.startswith("norm.")}, norm, plain, {"step": 3}, state
    )
    spawn_ranks(_reshard_rank, 2, str(one), str(back))
    from safetensors.torch import load_file

    shards = sorted(p.name for p in two.glob("*.safetensors"))
    assert shards == sorted(p.name for p in back.glob("*.safetensors")) and len(shards) == 4
    for shard in shards:
        before, after = load_file(two / shard), load_file(back / shard)
        assert before.keys() == after.keys()
        for name in before:
            assert torch.equal(before[name], after[name]) and before[name].dtype == after[name].dtype, (shard, name)
