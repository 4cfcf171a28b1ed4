"""`optim.decoder_grad=rows` (clt_forge/clt/lazy_adam.py): W_dec's Adam steps only the rows a step
touches and catches the others up when they are read. The run is dense Adam's: the weights, both
moments and the clipping norms after steps in which most rows got no gradient, for every activation
and both decodes, on one process and under feature sharding (gloo, 2 ranks), and end to end
through `clt train` and a resume. The only difference allowed is eps in the skipped steps'
denominators (the catch-up's closed form drops it), far below the tolerances here."""

from __future__ import annotations

import shutil

import pytest
import torch
from gloo import spawn_ranks
from test_sparse_decode import SETTINGS, make_clt
from test_train import dataset, train, train_config, train_records  # noqa: F401  (dataset: a module fixture)

from clt_forge.clt.lazy_adam import RowLazyAdam, enable_row_lazy_adam
from clt_forge.clt.loss import clt_loss
from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.distributed.feature_sharding import FeatureShardedCLT, feature_slice, shard_clt
from clt_forge.distributed.parallel import Parallel
from clt_forge.distributed.setup import dist_env
from clt_forge.errors import CLTError
from clt_forge.training import CLTTrainingRunner, load_checkpoint

L, D, F = 4, 16, 64
B = 3  # a few tokens per step: most (source, feature) rows get no gradient
STEPS = 8
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
CLIP = 0.5
EPS = 1e-8


def batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [(torch.randn(B, L, D, generator=generator), torch.randn(B, L, D, generator=generator)) for _ in range(n)]


def train_steps(clt: CrossLayerTranscoder, name: str, lazy: bool) -> tuple[list[float], torch.optim.Adam, list[float]]:
    """STEPS Adam steps (lr changing each step, as a schedule does) with global-norm clipping.
    Returns the norms before clipping, the optimizer and, with `lazy`, the share of rows that were
    behind (not yet caught up) after each step."""
    optimizer = torch.optim.Adam([p for p in clt.parameters() if p.requires_grad], lr=1e-2, eps=EPS)
    sink = (
        enable_row_lazy_adam(clt, optimizer, reads_all_rows=SETTINGS[name][2]["dead_coefficient"] != 0)
        if lazy
        else None
    )
    norms, behind = [], []
    for step, (x, y) in enumerate(batches()):
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * (1 + step) / STEPS
        out = clt(x)
        terms = clt_loss(out, y, out.decoder_norms, clt.jumprelu_threshold(), **SETTINGS[name][2])
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        norms.append(float(Parallel(dist_env({}, cuda=False)).clip_grad_norm(clt, CLIP)))
        optimizer.step()
        if sink is not None:
            assert clt.W_dec.grad is None, "no W_dec-sized gradient"
            sink.adam_step(optimizer, clt.W_dec)
            assert sink.row_step is not None
            behind.append(float((sink.row_step < step + 1).double().mean()))
    if sink is not None:
        before = clt.W_dec.detach().clone()
        sink.flush(clt.W_dec)
        behind.append(float((clt.W_dec.detach() - before).abs().max()))  # what the last catch-up moved
    return norms, optimizer, behind


@pytest.mark.parametrize("decode", ["dense", "sparse"])
@pytest.mark.parametrize("name", ["topk", "jumprelu-wide", "jumprelu", "batchtopk"])
def test_rows_train_like_dense_adam(name: str, decode: str) -> None:
    dense, lazy = make_clt(name, decode), make_clt(name, decode)
    dense_norms, dense_opt, _ = train_steps(dense, name, lazy=False)
    lazy_norms, lazy_opt, behind = train_steps(lazy, name, lazy=True)
    assert min(dense_norms) > CLIP
    torch.testing.assert_close(lazy_norms, dense_norms, **TOLERANCE)
    torch.testing.assert_close(dict(lazy.named_parameters()), dict(dense.named_parameters()), **TOLERANCE)
    dense_state, lazy_state = dense_opt.state[dense.W_dec], lazy_opt.state[lazy.W_dec]
    assert float(lazy_state["step"]) == float(dense_state["step"]) == STEPS
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(lazy_state[key], dense_state[key], **TOLERANCE)
    *behind, flushed = behind
    if SETTINGS[name][2]["dead_coefficient"] != 0:  # the dead term reads every norm: all kept up to date
        assert max(behind) == 0.0 and flushed == 0.0, behind
    else:  # a few tokens x a few features of 64 per layer: most rows wait between gradients
        assert min(behind[1:]) > 0.5, behind
        assert flushed > 1e-3, "the final catch-up moved rows (their momentum), well beyond the tolerance"


def test_catch_up_is_dense_adams_zero_gradient_steps() -> None:
    """One row with a gradient at step 1 only, then k steps without: its catch-up equals k steps of
    torch's Adam with a zero gradient (moments exactly; the weight to eps / sqrt(v))."""
    for k in (1, 5, 40):
        W_dense = torch.nn.Parameter(torch.zeros(2, 3, 5))  # F = 2, P = 3 (L = 2), D = 5
        W_lazy = torch.nn.Parameter(torch.zeros(2, 3, 5))
        gradient = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(k))
        dense = torch.optim.Adam([W_dense], lr=1e-2)
        lazy = torch.optim.Adam([W_lazy], lr=1e-2)
        sink = RowLazyAdam()
        sink.bind(lazy, [0, 2, 3])
        for step in range(1 + k):
            lr = 1e-2 / (1 + step)
            for opt in (dense, lazy):
                opt.param_groups[0]["lr"] = lr
            W_dense.grad = gradient if step == 0 else torch.zeros_like(gradient)
            dense.step()
            if step == 0:
                first = W_dense.detach().clone()
            index = torch.arange(2) if step == 0 else torch.zeros(0, dtype=torch.long)
            sink.rows = [(index, gradient[index][:, 0:2].flatten(1)), (index, gradient[index][:, 2:3].flatten(1))]
            sink.adam_step(lazy, W_lazy)
        assert sink.row_step is not None and bool((sink.row_step == 1).all())
        sink.flush(W_lazy)
        state, reference = lazy.state[W_lazy], dense.state[W_dense]
        torch.testing.assert_close(state["exp_avg"], reference["exp_avg"], rtol=1e-6, atol=0)
        torch.testing.assert_close(state["exp_avg_sq"], reference["exp_avg_sq"], rtol=1e-6, atol=0)
        torch.testing.assert_close(W_lazy, W_dense, rtol=1e-5, atol=1e-7)
        assert ((W_dense.detach() - first).abs() > 1e-3).all(), "the zero-gradient steps moved W"


def test_rows_under_bf16_autocast_follow_dense_adam() -> None:
    """The decode runs on autocast's bf16 copy of W_dec: the touched rows' gradients come in bf16
    and are cast for the fp32 Adam step (as `blocks` does)."""
    dense, lazy = make_clt("topk", "dense"), make_clt("topk", "dense")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense_norms, _, _ = train_steps(dense, "topk", lazy=False)
        lazy_norms, _, _ = train_steps(lazy, "topk", lazy=True)
    assert lazy.W_dec.dtype == torch.float32 and lazy.W_dec.grad is None
    torch.testing.assert_close(lazy_norms, dense_norms, rtol=1e-3, atol=0)
    torch.testing.assert_close(lazy.W_dec, dense.W_dec, rtol=1e-3, atol=1e-4)


def test_a_second_backward_before_the_step_is_refused() -> None:
    clt = make_clt("topk", "dense")
    optimizer = torch.optim.Adam(clt.parameters(), lr=1e-2)
    enable_row_lazy_adam(clt, optimizer, reads_all_rows=False)
    (x, y), _ = batches(2)
    (clt(x).reconstruction - y).square().mean().backward()
    with pytest.raises(CLTError, match=r"decoder_grad=rows: a second backward"):
        (clt(x).reconstruction - y).square().mean().backward()


def _sharded_rank(rank: int, world: int) -> None:
    reference = make_clt("topk", "dense")
    train_steps(reference, "topk", lazy=False)
    local = shard_clt(make_clt("topk", "sparse"), rank, world)
    sharded = FeatureShardedCLT(local)
    optimizer = torch.optim.Adam([p for p in local.parameters() if p.requires_grad], lr=1e-2)
    sink = enable_row_lazy_adam(local, optimizer, reads_all_rows=False)
    for step, (x, y) in enumerate(batches()):
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * (1 + step) / STEPS
        out = sharded(x)
        terms, _ = sharded.loss(out, y, **SETTINGS["topk"][2])
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        sharded.clip_grad_norm_(CLIP)
        optimizer.step()
        sink.adam_step(optimizer, local.W_dec)
    sink.flush(local.W_dec)
    cols = feature_slice(F, rank, world)
    torch.testing.assert_close(local.W_dec, reference.W_dec[cols], **TOLERANCE)
    torch.testing.assert_close(local.W_enc, reference.W_enc[..., cols], **TOLERANCE)
    torch.testing.assert_close(local.b_dec, reference.b_dec, **TOLERANCE)


def test_rows_under_feature_sharding_equal_one_dense_process() -> None:
    spawn_ranks(_sharded_rank, 2)


def test_clt_train_with_rows_equals_full_and_resumes_a_full_run(dataset, tmp_path):  # noqa: F811
    """TopK without the dead-feature term (the setting `rows` is for), 20 steps of 128 tokens: the
    checkpoint (after its flush) is the full run's, and so is a run resumed from the full run's
    step-10 checkpoint with `rows`."""
    settings = ["tokens=2560", "clt.activation=topk", "clt.k=4", "sparsity.dead_coefficient=0"]
    full = train(dataset, tmp_path / "full", *settings, "checkpoint_every=10")
    rows = train(dataset, tmp_path / "rows", *settings, "optim.decoder_grad=rows")
    mixed = tmp_path / "mixed"
    shutil.copytree(full, mixed)
    shutil.rmtree(mixed / "checkpoints" / "final")
    CLTTrainingRunner(train_config(dataset, mixed, *settings, f"resume={mixed}", "optim.decoder_grad=rows")).run()
    expected = load_checkpoint(full / "checkpoints" / "final")[0].state_dict()
    for run in (rows, mixed):
        got = load_checkpoint(run / "checkpoints" / "final")[0].state_dict()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=lambda m, run=run: f"{run.name}: {m}")
    curve = lambda run: [r["grad_norm"] for r in train_records(run)]  # noqa: E731
    torch.testing.assert_close(curve(rows), curve(full), rtol=1e-4, atol=1e-6)


def test_rows_refused_with_fp16_and_bf16_moments(dataset, tmp_path):  # noqa: F811
    with pytest.raises(CLTError, match=r"optim\.decoder_grad=rows does not work with precision=fp16"):
        train(dataset, tmp_path / "fp16", "tokens=256", "precision=fp16", "optim.decoder_grad=rows")
    with pytest.raises(CLTError, match=r"optim\.exp_avg_dtype=bfloat16 needs optim\.decoder_grad=blocks"):
        train_config(dataset, tmp_path / "bf16", "optim.decoder_grad=rows", "optim.exp_avg_dtype=bfloat16")
