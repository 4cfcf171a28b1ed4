"""The sparse decode's C kernels (clt_forge/clt/native.py, sparse_kernels.c): they build with the
machine's C compiler; the decode and the sampled grad z equal torch's products; W_dec's Adam step
equals torch's gradient and fused Adam to fp32 rounding (fp32 and bf16 first moments, clipping
scale, no coefficient / no reconstruction gradient, one and two threads) and leaves the decoder
norms of the stepped W_dec, which stop being used once W_dec changes; where no compiler works,
clt.native_kernel=auto trains with torch ops while `on` stops with the reason.
(tests/test_sparse_decode.py and tests/test_decoder_blocks.py train with them against the dense
decode and the full gradient, every activation.)"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from test_decoder_blocks import batches, train_steps
from test_sparse_decode import make_clt

from clt_forge.clt import native
from clt_forge.clt.deferred import enable_deferred_decoder
from clt_forge.clt.model import CrossLayerTranscoder, pair_offsets
from clt_forge.clt.sparse_decode import decoder_norms_packed
from clt_forge.config.compose import compose_stage
from clt_forge.errors import CLTError

L, D, B, F = 4, 16, 24, 40
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
BETA1, BETA2, EPS, LR = 0.9, 0.999, 1e-8, 1e-2


def reference_grad(W, z, grad_recon, coef, scale, offsets):
    """coef * W plus z[:, l]^T grad_recon[:, l:] per source, times scale, by dense torch ops."""
    grad = torch.empty_like(W)
    for source in range(L):
        block = W[:, offsets[source] : offsets[source + 1]].reshape(F, -1)
        part = block * (coef[source][:, None] if coef is not None else 0.0)
        if grad_recon is not None:
            part = part + z[:, source].t() @ grad_recon[:, source:].reshape(B, -1)
        grad[:, offsets[source] : offsets[source + 1]] = part.view(F, L - source, D)
    return grad * scale


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("exp_avg_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("parts", ["all", "no coef", "no reconstruction"])
def test_kernel_equals_torch_gradient_and_fused_adam(threads: int, exp_avg_dtype: torch.dtype, parts: str) -> None:
    generator = torch.Generator().manual_seed(3)
    offsets = pair_offsets(L)
    W = torch.randn(F, offsets[-1], D, generator=generator)
    exp_avg = (torch.randn(W.shape, generator=generator) * 0.01).to(exp_avg_dtype)
    exp_avg_sq = torch.rand(W.shape, generator=generator) * 0.01
    z = torch.relu(torch.randn(B, L, F, generator=generator) - 1.5)  # ~7% active; some features never
    z[:, 1, :5] = 0.0
    grad_recon = None if parts == "no reconstruction" else torch.randn(B, L, D, generator=generator)
    coef = None if parts == "no coef" else torch.randn(L, F, generator=generator)
    scale, step = 0.7, 4.0
    grad = reference_grad(W, z, grad_recon, coef, scale, offsets)
    expected = [W.clone(), exp_avg.float().clone(), exp_avg_sq.clone()]
    torch._fused_adam_(
        [expected[0]], [grad], [expected[1]], [expected[2]], [], [torch.tensor(step)],
        lr=LR, beta1=BETA1, beta2=BETA2, weight_decay=0.0, eps=EPS, amsgrad=False, maximize=False,
    )  # fmt: skip
    z_t = [z[:, source].t().contiguous().to_sparse_csr() for source in range(L)]
    before, original = torch.get_num_threads(), W.clone()
    torch.set_num_threads(threads)
    try:
        versions = [t._version for t in (W, exp_avg, exp_avg_sq)]
        norms = native.decoder_adam(
            W, exp_avg, exp_avg_sq, offsets, z_t, grad_recon, coef, scale, LR, BETA1, BETA2, EPS, step
        )
    finally:
        torch.set_num_threads(before)
    assert all(t._version > v for t, v in zip((W, exp_avg, exp_avg_sq), versions, strict=True)), "autograd sees it"
    torch.testing.assert_close(W, expected[0], **TOLERANCE)
    torch.testing.assert_close(exp_avg_sq, expected[2], **TOLERANCE)
    if exp_avg_dtype == torch.float32:
        torch.testing.assert_close(exp_avg, expected[1], **TOLERANCE)
    else:  # stored rounded to nearest even from the fp32 value, as torch's cast rounds
        assert exp_avg.dtype == torch.bfloat16
        torch.testing.assert_close(exp_avg, expected[1].to(torch.bfloat16), rtol=2**-8, atol=0)
    torch.testing.assert_close(norms, decoder_norms_packed(W, offsets), **TOLERANCE)
    assert (W - original).abs().max() > 100 * TOLERANCE["rtol"], "W moved"


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_and_sampled_grad_z_equal_torch_products(threads: int) -> None:
    generator = torch.Generator().manual_seed(4)
    offsets = pair_offsets(L)
    W = torch.randn(F, offsets[-1], D, generator=generator)
    z = torch.relu(torch.randn(B, L, F, generator=generator) - 1.5)
    z[3] = 0.0  # a token with no active feature
    grad_recon = torch.randn(B, L, D, generator=generator)
    needed = (z != 0) | (torch.rand(B, L, F, generator=generator) < 0.02)  # active, plus a window
    expected_recon, expected_grad_z = torch.zeros(B, L, D), torch.zeros(L, B, F)
    for source in range(L):
        block = W[:, offsets[source] : offsets[source + 1]].reshape(F, -1)
        expected_recon[:, source:] += (z[:, source] @ block).view(B, L - source, D)
        expected_grad_z[source] = grad_recon[:, source:].reshape(B, -1) @ block.t() * needed[:, source]
    patterns = [needed[:, source].t().contiguous().to_sparse_csr() for source in range(L)]
    patterns[2] = None  # a layer left to the caller (the dense GEMM)
    out = torch.full((L, B, F), 7.0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        recon = native.sparse_decode([z[:, source].to_sparse_csr() for source in range(L)], W, offsets)
        native.sampled_grad_z(patterns, W, offsets, grad_recon, out)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(recon, expected_recon, **TOLERANCE)
    assert torch.equal(out[2], torch.full((B, F), 7.0)), "no pattern: not written"
    written = out.masked_fill(~needed.permute(1, 0, 2), 0.0)
    written[2] = expected_grad_z[2]
    torch.testing.assert_close(written, expected_grad_z, **TOLERANCE)
    assert torch.equal(out.masked_fill(needed.permute(1, 0, 2), 7.0), torch.full((L, B, F), 7.0)), "only the pattern"


def test_kernels_refuse_what_they_cannot_run() -> None:
    offsets = pair_offsets(L)
    W = torch.zeros(F, offsets[-1], D)
    with pytest.raises(ValueError, match=r"exp_avg must be a contiguous CPU tensor of shape \(40, 10, 16\)"):
        native.decoder_adam(W, W.transpose(0, 1), W.clone(), offsets, [], None, None, 1.0, LR, 0.9, 0.999, EPS, 1.0)
    with pytest.raises(ValueError, match=r"grad_recon must be a contiguous CPU tensor of shape \(24, 4, 16\)"):
        native.sampled_grad_z([None] * L, W, offsets, torch.zeros(B, L, D).transpose(0, 1), torch.zeros(L, B, F))
    with pytest.raises(ValueError, match=r"W_dec and exp_avg_sq must be float32"):
        native.decoder_adam(W.double(), W.double(), W.double(), offsets, [], None, None, 1.0, LR, 0.9, 0.999, EPS, 1.0)


def test_cached_norms_are_dropped_once_w_dec_changes() -> None:
    clt = make_clt("topk", "sparse")
    sink = enable_deferred_decoder(clt, native_kernel="on")
    train_steps(clt, "topk", True, steps=1)
    cached = sink.cached_norms(clt.W_dec)
    assert cached is not None
    torch.testing.assert_close(cached, decoder_norms_packed(clt.W_dec, clt.offsets), **TOLERANCE)
    with torch.no_grad():
        clt.W_dec[0].mul_(2.0)  # any in-place change bumps the version counter
    assert sink.cached_norms(clt.W_dec) is None
    assert sink.cached_norms(clt.W_dec.detach().clone()) is None, "another tensor's storage"
    out = clt(batches(1)[0][0])
    torch.testing.assert_close(out.decoder_norms, decoder_norms_packed(clt.W_dec, clt.offsets))


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("CLT_FORGE_CACHE", str(tmp_path))  # no library built earlier
    native.load.cache_clear()
    yield
    native.load.cache_clear()
    monkeypatch.undo()
    native.load()


def test_without_a_compiler_auto_uses_torch_ops_and_on_stops(no_compiler) -> None:
    assert native.load() is None
    assert "could not be built" in (native.unavailable() or "")
    assert not native.usable("auto", torch.zeros(1))
    auto, off = make_clt("topk", "sparse"), make_clt("topk", "sparse")
    enable_deferred_decoder(auto, native_kernel="auto")
    enable_deferred_decoder(off, native_kernel="off")
    train_steps(auto, "topk", True, steps=2)
    train_steps(off, "topk", True, steps=2)
    assert torch.equal(auto.W_dec, off.W_dec), "auto fell back to the same torch ops"
    on = make_clt("topk", "sparse")
    on.native_kernel = "on"
    with pytest.raises(CLTError, match=r"clt\.native_kernel=on: the native kernels \(sparse_kernels\.c\) could not"):
        train_steps(on, "topk", True, steps=1)  # stops at the forward's decode


def test_native_kernel_mode_is_checked() -> None:
    with pytest.raises(CLTError, match=r"clt\.native_kernel='fast': use auto, on or off"):
        enable_deferred_decoder(make_clt("topk", "sparse"), native_kernel="fast")
    with pytest.raises(CLTError, match=r"clt\.native_kernel='yes': use auto, on or off"):
        CrossLayerTranscoder(L, D, F, native_kernel="yes")
    with pytest.raises(ValueError, match=r"clt\.native_kernel='fastest': use auto, on or off"):
        OmegaConf.to_object(compose_stage("train", ["clt.native_kernel=fastest"]))
