"""`optim.decoder_grad=blocks` (clt_forge/clt/deferred.py): W_dec is trained without a W_dec-sized
gradient, and the run is the one `full` trains (fp32 rounding only): clipping norms, weights and
Adam moments after several steps for every activation and both decodes, on one process and
under feature sharding (gloo, 2 ranks), and end to end through `clt train` and a resume. With
optim.exp_avg_dtype=bfloat16 W_dec's first moment is bf16: close to the fp32 run, resumed exactly."""

from __future__ import annotations

import shutil

import pytest
import torch
from gloo import spawn_ranks
from safetensors.torch import load_file
from test_sparse_decode import SETTINGS, make_clt
from test_train import dataset, train, train_config, train_records  # noqa: F401  (dataset: a module fixture)

from clt_forge.clt import deferred, sparse_decode
from clt_forge.clt.deferred import enable_deferred_decoder
from clt_forge.clt.loss import clt_loss
from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.distributed.feature_sharding import FeatureShardedCLT, feature_slice, shard_clt
from clt_forge.distributed.parallel import Parallel
from clt_forge.distributed.setup import dist_env
from clt_forge.errors import CLTError
from clt_forge.training import CLTTrainingRunner, load_checkpoint

L, D, F, B = 4, 16, 64, 48
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
CLIP = 0.5  # below the gradient norms here: every step clips
LR = 1e-2


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(B, L, D, generator=generator), torch.randn(B, L, D, generator=generator)) for _ in range(n)]


def train_steps(
    clt: CrossLayerTranscoder, name: str, fused: bool, clip=None, steps: int = 3
) -> tuple[list[float], torch.optim.Adam]:
    """`steps` Adam steps (lr LR) with global-norm clipping; returns the norms before clipping."""
    clip = clip or (lambda: Parallel(dist_env({}, cuda=False)).clip_grad_norm(clt, CLIP))
    optimizer = torch.optim.Adam([p for p in clt.parameters() if p.requires_grad], lr=LR, fused=fused)
    norms = []
    for x, y in batches(steps):
        out = clt(x)
        terms = clt_loss(out, y, out.decoder_norms, clt.jumprelu_threshold(), **SETTINGS[name][2])
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        norms.append(float(clip()))
        optimizer.step()
        if clt.decoder_grad is not None and hasattr(clt.decoder_grad, "adam_step"):
            assert clt.W_dec.grad is None, "no W_dec-sized gradient"
            clt.decoder_grad.adam_step(optimizer, clt.W_dec)
    return norms, optimizer


@pytest.mark.parametrize("decode", ["dense", "sparse", "sparse-native"])
@pytest.mark.parametrize("name", ["jumprelu", "topk", "batchtopk"])
def test_blocks_train_like_the_full_gradient(name: str, decode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dense decode: chunks of pairs, for-loop Adam. Sparse decode with optim.native_kernel=off:
    chunks of 3 features over all pairs (64 = 21 x 3 + 1), each stepped by torch's fused Adam, as
    the full side's optimizer. sparse-native (native_kernel=on): the native kernel steps W_dec
    with no chunk built, and leaves the decoder norms that the next forward reads."""
    native = decode == "sparse-native"
    decode = "sparse" if native else decode
    pairs = L * (L + 1) // 2
    chunk = 3 * pairs * D if decode == "sparse" else deferred.CHUNK_ELEMENTS
    monkeypatch.setattr(deferred, "CHUNK_ELEMENTS", chunk)
    fused_rows: list[int] = []  # rows of W_dec per fused Adam call on a W_dec chunk
    fused_adam = torch._fused_adam_

    def counting(params, *args, **kwargs):
        fused_rows.extend(p.shape[0] for p in params if p.dim() == 3 and p.shape[1:] == (pairs, D))
        return fused_adam(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", counting)
    built = []  # passes over the gradient: one per step, the clipping norm comes from Gram matrices
    blocks_pass = deferred.DeferredDecoderGrad._blocks
    monkeypatch.setattr(deferred.DeferredDecoderGrad, "_blocks", lambda self: built.append(1) or blocks_pass(self))
    full, blocks = make_clt(name, decode), make_clt(name, decode)
    sink = enable_deferred_decoder(blocks, native_kernel="on" if native else "off")
    fused = decode == "sparse"  # torch's fused kernel on one side, its for-loop Adam on the other
    full_norms, full_opt = train_steps(full, name, fused)
    assert fused_rows == ([F] * 3 if fused else [])  # the full side: W_dec in one call per step
    fused_rows.clear()
    norm_passes = []  # forwards that computed the decoder norms from W_dec
    packed = sparse_decode.decoder_norms_packed
    monkeypatch.setattr(sparse_decode, "decoder_norms_packed", lambda *a: norm_passes.append(1) or packed(*a))
    block_norms, block_opt = train_steps(blocks, name, fused)
    if native:
        assert not fused_rows and not built and sink._buffer is None, "no chunk: the kernel builds each row"
        assert len(norm_passes) == 1, "steps 2 and 3 read the norms the kernel left"
        assert sink.norms is not None
        torch.testing.assert_close(sink.cached_norms(blocks.W_dec), packed(blocks.W_dec, blocks.offsets), **TOLERANCE)
    else:
        assert fused_rows == ([3] * 21 + [1]) * 3 if fused else not fused_rows
        assert len(built) == 3 and len(norm_passes) == 3
    assert min(full_norms) > CLIP
    torch.testing.assert_close(block_norms, full_norms, **TOLERANCE)
    torch.testing.assert_close(dict(blocks.named_parameters()), dict(full.named_parameters()), **TOLERANCE)
    full_state, block_state = full_opt.state[full.W_dec], block_opt.state[blocks.W_dec]
    assert float(block_state["step"]) == float(full_state["step"]) == 3.0
    assert block_state["step"].device == full_state["step"].device
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(block_state[key], full_state[key], **TOLERANCE)
    if not native:
        assert sink._buffer is not None and sink._buffer.numel() == min(chunk, F * L * D)  # a chunk, never W_dec
    assert blocks.W_dec.numel() == F * pairs * D


def test_without_clipping_only_one_pass_and_exact_to_for_loop_adam() -> None:
    full, blocks = make_clt("jumprelu", "dense"), make_clt("jumprelu", "dense")
    sink = enable_deferred_decoder(blocks, clip=False)
    train_steps(full, "jumprelu", False, clip=lambda: 0.0)
    train_steps(blocks, "jumprelu", False, clip=lambda: 0.0)
    assert sink.square is None
    assert torch.equal(blocks.W_dec, full.W_dec), "the same formula as torch's for-loop Adam, bit for bit"


def test_blocks_under_bf16_autocast_follow_the_full_gradient() -> None:
    """The decode runs on autocast's bf16 copy of W_dec; the chunks are built in bf16 and cast."""
    full, blocks = make_clt("topk", "dense"), make_clt("topk", "dense")
    enable_deferred_decoder(blocks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full_norms, _ = train_steps(full, "topk", False)
        block_norms, _ = train_steps(blocks, "topk", False)
    assert blocks.W_dec.dtype == torch.float32 and blocks.W_dec.grad is None
    torch.testing.assert_close(block_norms, full_norms, rtol=1e-3, atol=0)
    torch.testing.assert_close(blocks.W_dec, full.W_dec, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("decode", ["dense", "sparse"])  # the for-loop update / the fused kernel per chunk
@pytest.mark.parametrize("name", ["jumprelu", "topk"])
def test_bf16_exp_avg_stays_bf16_and_trains_close_to_fp32_moments(name: str, decode: str) -> None:
    """optim.exp_avg_dtype=bfloat16: W_dec's first moment is a bf16 tensor, rounded to nearest from
    the fp32 update, and exp_avg_sq stays fp32. Step 1 moves W_dec exactly as the fp32 run (its
    update uses the unrounded m). Later steps read the stored m, off by bf16's rounding (relative
    2^-8 at most): at worst 0.67 and 1.19 x LR x 2^-8 in the updates of steps 2 and 3 (through the
    bias corrections and v_hat, for fixed gradients), 1.85 in all; the tolerance 3 x LR x 2^-8
    leaves the rest to the gradients of the slightly different weights. Measured: 0.65 after step 2,
    1.42 / 1.60 after step 3 (jumprelu / topk), while W_dec moved up to 0.03 (250x the tolerance)."""
    for steps in (1, 3):
        fp32, bf16 = make_clt(name, decode), make_clt(name, decode)
        enable_deferred_decoder(fp32)
        enable_deferred_decoder(bf16, exp_avg_dtype=torch.bfloat16)
        _, fp32_opt = train_steps(fp32, name, decode == "sparse", steps=steps)
        _, bf16_opt = train_steps(bf16, name, decode == "sparse", steps=steps)
        state, reference = bf16_opt.state[bf16.W_dec], fp32_opt.state[fp32.W_dec]
        assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.float32
        assert float(state["step"]) == steps
        if steps == 1:
            assert torch.equal(state["exp_avg"], reference["exp_avg"].to(torch.bfloat16)), "round to nearest"
            assert torch.equal(bf16.W_dec, fp32.W_dec)
    assert not torch.equal(bf16.W_dec, fp32.W_dec), "the option changes the run"
    torch.testing.assert_close(bf16.W_dec, fp32.W_dec, rtol=0, atol=3 * LR * 2**-8)
    assert (fp32.W_dec - make_clt(name, decode).W_dec).abs().max() > 100 * 3 * LR * 2**-8, "W_dec did move"


def test_a_second_backward_before_the_step_is_refused() -> None:
    clt = make_clt("topk", "dense")
    enable_deferred_decoder(clt)
    (x, y), _ = batches(2)
    for attempt in range(2):
        loss = (clt(x).reconstruction - y).square().mean()
        if attempt:
            with pytest.raises(CLTError, match=r"gradient accumulation needs optim\.decoder_grad=full"):
                loss.backward()
        else:
            loss.backward()


def _sharded_rank(rank: int, world: int, name: str) -> None:
    reference = make_clt(name, "dense")
    train_steps(reference, name, False)
    local = shard_clt(make_clt(name, "sparse"), rank, world)
    enable_deferred_decoder(local)
    sharded = FeatureShardedCLT(local)
    optimizer = torch.optim.Adam([p for p in local.parameters() if p.requires_grad], lr=1e-2)
    for x, y in batches(3):
        out = sharded(x)
        terms, _ = sharded.loss(out, y, **SETTINGS[name][2])
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        sharded.clip_grad_norm_(CLIP)
        optimizer.step()
        local.decoder_grad.adam_step(optimizer, local.W_dec)
    cols = feature_slice(F, rank, world)
    torch.testing.assert_close(local.W_dec, reference.W_dec[cols], **TOLERANCE)
    torch.testing.assert_close(local.W_enc, reference.W_enc[..., cols], **TOLERANCE)
    torch.testing.assert_close(local.b_dec, reference.b_dec, **TOLERANCE)


@pytest.mark.parametrize("name", ["jumprelu", "topk"])
def test_blocks_under_feature_sharding_equal_one_full_process(name: str) -> None:
    spawn_ranks(_sharded_rank, 2, name)


@pytest.mark.parametrize(
    "clt_overrides",
    [(), ("clt.activation=topk", "clt.k=2", "clt.decode=sparse")],  # sparse: runs of features, fused Adam
    ids=["default", "topk-sparse"],
)
def test_clt_train_with_blocks_equals_full_and_resumes_a_full_run(dataset, tmp_path, clt_overrides):  # noqa: F811
    tokens = "tokens=2560"  # 20 steps of 128; the step-10 checkpoint is the resume point
    full = train(dataset, tmp_path / "full", tokens, "checkpoint_every=10", *clt_overrides)
    blocks = train(dataset, tmp_path / "blocks", tokens, "optim.decoder_grad=blocks", *clt_overrides)
    mixed = tmp_path / "mixed"
    shutil.copytree(full, mixed)
    shutil.rmtree(mixed / "checkpoints" / "final")
    resumed = train_config(dataset, mixed, tokens, f"resume={mixed}", "optim.decoder_grad=blocks", *clt_overrides)
    CLTTrainingRunner(resumed).run()
    expected = load_checkpoint(full / "checkpoints" / "final")[0].state_dict()
    for run in (blocks, mixed):
        got = load_checkpoint(run / "checkpoints" / "final")[0].state_dict()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=lambda m, run=run: f"{run.name}: {m}")
    curve = lambda run: [r["grad_norm"] for r in train_records(run)]  # noqa: E731
    torch.testing.assert_close(curve(blocks), curve(full), rtol=1e-4, atol=1e-6)  # clipping saw W_dec's part


def test_clt_train_with_bf16_exp_avg_resumes_exactly_and_across_settings(dataset, tmp_path):  # noqa: F811
    """A bf16-moment run killed after its step-5 checkpoint and resumed ends with the very weights
    of the uninterrupted run; a float32 run's checkpoint resumes with bfloat16 (exp_avg cast down)
    and a bfloat16 run's with decoder_grad=full (cast up: torch's fused Adam wants fp32)."""
    tokens, bf16 = "tokens=1280", ["optim.decoder_grad=blocks", "optim.exp_avg_dtype=bfloat16"]  # 10 steps
    whole = train(dataset, tmp_path / "whole", tokens, "checkpoint_every=5", *bf16)
    fp32 = train(dataset, tmp_path / "fp32", tokens, "checkpoint_every=5", "optim.decoder_grad=blocks")
    final = lambda run: load_checkpoint(run / "checkpoints" / "final")[0].state_dict()  # noqa: E731
    expected = final(whole)
    assert not torch.equal(expected["W_dec"], final(fp32)["W_dec"])
    runs = {"resumed": (whole, bf16), "from-fp32": (fp32, bf16), "to-full": (whole, ["optim.decoder_grad=full"])}
    for name, (source, settings) in runs.items():
        run = tmp_path / name
        shutil.copytree(source, run)
        shutil.rmtree(run / "checkpoints" / "final")
        CLTTrainingRunner(train_config(dataset, run, tokens, f"resume={run}", *settings)).run()
        got = final(run)
        if name == "resumed":
            for key, value in expected.items():
                assert torch.equal(got[key], value), f"{key}: the resumed bf16 run left the uninterrupted one"
            state = load_file(run / "checkpoints" / "final" / "training_state.safetensors")["exp_avg.W_dec"]
            assert torch.equal(state, state.bfloat16().float()), "written as fp32, holding bf16 values"
        else:  # half the steps with the other moment dtype: the same run to bf16 rounding of m (test above)
            # measured: W_dec within 7.8e-6, the rest 1.2e-7, where one step moves W_dec up to lr = 2e-4
            torch.testing.assert_close(got, expected, rtol=0, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_bf16_exp_avg_refused_without_blocks(dataset, tmp_path):  # noqa: F811
    with pytest.raises(CLTError, match=r"optim\.exp_avg_dtype=bfloat16 needs optim\.decoder_grad=blocks"):
        train_config(dataset, tmp_path / "full", "optim.exp_avg_dtype=bfloat16")
    with pytest.raises(ValueError, match=r"optim\.exp_avg_dtype='float16': use float32 or bfloat16"):
        train_config(dataset, tmp_path / "bad", "optim.decoder_grad=blocks", "optim.exp_avg_dtype=float16")


def test_blocks_refused_with_fp16_and_finetuning(dataset, tmp_path):  # noqa: F811
    with pytest.raises(CLTError, match="precision=fp16"):
        train(dataset, tmp_path / "fp16", "tokens=256", "precision=fp16", "optim.decoder_grad=blocks")
    with pytest.raises(ValueError, match=r"optim\.decoder_grad='sideways'"):
        train_config(dataset, tmp_path / "bad", "optim.decoder_grad=sideways")
