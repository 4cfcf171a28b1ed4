"""The sparse decode equals the dense one (fp32 rounding only): the loss terms, every parameter's
gradient and the weights after one Adam step, for each activation; on one process and under
feature sharding on gloo (2 processes)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from gloo import spawn_ranks

from clt_forge.clt import native, sparse_decode
from clt_forge.clt.loss import clt_loss
from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.clt.sparse_decode import (
    DECODE,
    SDDMM_MAX_FRACTION,
    SDDMM_RUN_BYTES,
    SparseDecodeWithNorms,
    _grad_z_layer,
    _needed_patterns,
    _sampled_patterns,
    decoder_grad_square,
    decoder_norms_packed,
    full_decoder_grad,
    source_block,
)
from clt_forge.distributed.feature_sharding import FeatureShardedCLT, feature_slice, shard_clt

L, D, F, B = 4, 16, 64, 48
SETTINGS = {  # activation -> (k, bandwidth, loss coefficients)
    "jumprelu": (0, 0.02, {"l0_coefficient": 0.3, "c": 2.0, "dead_coefficient": 0.01}),
    "jumprelu-wide": (0, 1.0, {"l0_coefficient": 0.3, "c": 2.0, "dead_coefficient": 0.0}),
    "topk": (3, 1.0, {"l0_coefficient": 0.3, "c": 1.0, "dead_coefficient": 0.0}),
    "batchtopk": (2, 1.0, {"l0_coefficient": 0.0, "c": 1.0, "dead_coefficient": 0.01}),
}
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def make_clt(name: str, decode: str) -> CrossLayerTranscoder:
    k, bandwidth, _ = SETTINGS[name]
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(
        L, D, F, bandwidth=bandwidth, activation=name.split("-")[0], k=k, decode=decode, jumprelu_threshold=0.5
    )
    with torch.no_grad():
        clt.b_enc.normal_(-0.4, 0.2)  # a few percent active, as a trained CLT
        clt.b_dec.normal_(0, 0.1)
    return clt


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(B, L, D, generator=generator), torch.randn(B, L, D, generator=generator)


def step(clt: CrossLayerTranscoder, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(loss terms, gradients) of one training step; the CLT has taken one Adam step afterwards."""
    x, y = batch()
    out = clt(x)
    terms = clt_loss(out, y, out.decoder_norms, clt.jumprelu_threshold(), **SETTINGS[name][2])
    terms.total.backward()
    grads = {n: p.grad.clone() for n, p in clt.named_parameters() if p.grad is not None}
    torch.optim.Adam([p for p in clt.parameters() if p.requires_grad], lr=1e-2).step()
    return {n: getattr(terms, n).detach() for n in ("total", "mse", "sparsity", "dead")}, grads


@pytest.mark.parametrize("kernels", ["torch", "native"])
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_sparse_equals_dense(name: str, sampled: bool, kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sampled`: grad z by the sampled product in every layer (above SDDMM_MAX_FRACTION here), in
    runs of 5 decoder rows: TopK / BatchTopK reuse z's own pattern, JumpReLU's window converts its own.
    `kernels`: torch's CSR ops (clt.native_kernel=off), or the C kernels of clt_forge/clt/native.py (on)."""
    if sampled:
        monkeypatch.setattr(sparse_decode, "SDDMM_MAX_FRACTION", 1.0)
        monkeypatch.setattr(sparse_decode, "SDDMM_RUN_BYTES", 5 * L * D * 4)
    calls: list[str] = []
    for kernel in ("sparse_decode", "sampled_grad_z"):
        original = getattr(native, kernel)
        monkeypatch.setattr(native, kernel, lambda *a, k=kernel, f=original: calls.append(k) or f(*a))
    dense, sparse = make_clt(name, "dense"), make_clt(name, "sparse")
    sparse.native_kernel = "on" if kernels == "native" else "off"
    x, _ = batch()
    with torch.no_grad():  # no training forward: TopK's theta estimate stays as it is
        active = (dense(x).features != 0).float().mean().item()
    assert 0.0 < active < 0.2  # the sparse path has something to skip
    dense_terms, dense_grads = step(dense, name)
    sparse_terms, sparse_grads = step(sparse, name)
    torch.testing.assert_close(sparse_terms, dense_terms, **TOLERANCE)
    assert sparse_grads.keys() == dense_grads.keys()
    assert ("log_threshold" in dense_grads) == name.startswith("jumprelu")
    torch.testing.assert_close(sparse_grads, dense_grads, **TOLERANCE)
    torch.testing.assert_close(dict(sparse.named_parameters()), dict(dense.named_parameters()), **TOLERANCE)
    if kernels == "native":  # the forward, and grad z of the sampled layers (all of them when `sampled`)
        assert calls[0] == "sparse_decode" and (not sampled or calls[1:] == ["sampled_grad_z"])
    else:
        assert not calls


def test_sparse_decode_alone_without_grad_mask_and_without_norms() -> None:
    """decode(z) with no activation mask: grad z everywhere; the norms' gradient absent."""
    for decode in ("dense", "sparse"):
        clt = make_clt("topk", decode)
        z = torch.relu(torch.randn(B, L, F) - 2.0).requires_grad_()
        clt.decode(z).square().sum().backward()
        if decode == "dense":
            expected = (z.grad.clone(), clt.W_dec.grad.clone())
    torch.testing.assert_close((z.grad, clt.W_dec.grad), expected, **TOLERANCE)


@pytest.mark.parametrize("run_bytes", [SDDMM_RUN_BYTES, 3 * 5 * D * 4])
def test_grad_z_sampled_where_needed_only(run_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampled grad z equals the dense product at the needed entries and 0 elsewhere, in one
    run of rows or in runs of 3 (the last one shorter), from a contiguous or a strided block."""
    monkeypatch.setattr(sparse_decode, "SDDMM_RUN_BYTES", run_bytes)
    generator = torch.Generator().manual_seed(3)
    grad, block = torch.randn(B, 5 * D, generator=generator), torch.randn(F, 5 * D, generator=generator)
    needed = torch.rand(B, F, generator=generator) < 0.01  # below SDDMM_MAX_FRACTION: the sampled product
    needed[:, 3:6] = False  # a run without any needed entry
    assert 0 < needed.sum() <= SDDMM_MAX_FRACTION * needed.numel()
    pattern = _needed_patterns(needed[:, None], torch.float32)[0]
    out = torch.full((B, F), 7.0)
    _grad_z_layer(grad, block, needed, out, pattern)
    torch.testing.assert_close(out, (grad @ block.t()) * needed, **TOLERANCE)
    wide = torch.randn(F, 9 * D, generator=generator)[:, 2 : 2 + 5 * D]  # a strided block, as W_dec's
    strided_grad = torch.randn(B, 7 * D, generator=generator)[:, D : 6 * D]  # as grad recon[:, l:]
    _grad_z_layer(strided_grad, wide, needed, out, pattern)
    torch.testing.assert_close(out, (strided_grad @ wide.t()) * needed, **TOLERANCE)


def test_needed_patterns_are_each_layers_transposed_mask() -> None:
    """One nonzero over all layers gives each layer's mask^T as the CSR `to_sparse_csr` gives, with
    an empty layer and features needed by no token among them."""
    generator = torch.Generator().manual_seed(5)
    masks = torch.rand(B, L, F, generator=generator) < 0.03
    masks[:, 2] = False  # a layer with nothing needed
    masks[:, :, :7] = False  # features no token needs
    patterns = _needed_patterns(masks, torch.float32)
    assert len(patterns) == L
    for layer, pattern in enumerate(patterns):
        expected = masks[:, layer].t().float().to_sparse_csr()
        assert pattern.shape == (F, B) and pattern.dtype == torch.float32
        assert torch.equal(pattern.crow_indices(), expected.crow_indices())
        assert torch.equal(pattern.col_indices(), expected.col_indices())
        assert torch.equal(pattern.to_dense(), expected.to_dense())


def test_sampled_patterns_per_layer() -> None:
    """A layer needing exactly z's entries takes z^T's pattern, one needing more (JumpReLU's window)
    but at most SDDMM_MAX_FRACTION its own, one needing more than that none (the dense GEMM)."""
    generator = torch.Generator().manual_seed(6)
    z = torch.relu(torch.randn(B, 3, F, generator=generator) - 2.6)  # ~0.5% active
    window = torch.rand(B, 3, F, generator=generator) < 0.01
    needed = z != 0
    needed[:, 1] |= window[:, 1]
    needed[:, 2] |= torch.rand(B, F, generator=generator) < 0.2
    z_csr = [z[:, s].to_sparse_csr() for s in range(3)]
    transposed = [c.t().to_sparse_csr() for c in z_csr]
    assert needed[:, 1].sum() > z_csr[1]._nnz() and needed[:, 1].sum() <= SDDMM_MAX_FRACTION * B * F
    patterns = _sampled_patterns(needed, z_csr, transposed.__getitem__)
    assert patterns[0] is transposed[0]
    assert patterns[1] is not None and torch.equal(patterns[1].to_dense().bool(), needed[:, 1].t())
    assert patterns[2] is None
    assert _sampled_patterns(None, z_csr, transposed.__getitem__) == [None] * 3


@pytest.mark.parametrize("sparse", [False, True])
def test_grad_square_from_grams_equals_the_built_gradient(sparse: bool) -> None:
    """`decoder_grad_square` (the clipping norm of `blocks` without building the gradient) equals
    the built gradient's sum of squares: with and without the norm terms, and without grad recon."""
    generator = torch.Generator().manual_seed(11)
    clt = make_clt("topk", "dense")
    W_dec, offsets = clt.W_dec.detach(), clt.offsets
    z = torch.relu(torch.randn(B, L, F, generator=generator) - 1.8)  # ~4% active
    grad_recon = torch.randn(B, L, D, generator=generator)
    norms = decoder_norms_packed(W_dec, offsets)
    grad_z_lbf = torch.stack([grad_recon[:, s:].flatten(1) @ source_block(W_dec, offsets, s).t() for s in range(L)]) * (
        z != 0
    ).transpose(0, 1)  # only where z != 0, as the sparse decode computes it
    for coef in (None, torch.randn(L, F, generator=generator)):
        for recon in (grad_recon, None):
            built = full_decoder_grad(torch.empty_like(W_dec), W_dec, offsets, lambda s: z[:, s].t(), recon, coef)
            expected = built.double().square().sum()
            z_csr = [z[:, s].to_sparse_csr() for s in range(L)] if sparse else None
            got = decoder_grad_square(z, grad_z_lbf, recon, norms, coef, z_csr)
            assert got.dtype == torch.float64 and (expected > 0) == (coef is not None or recon is not None)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_auto_picks_sparse_by_active_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = SparseDecodeWithNorms.apply
    monkeypatch.setattr(SparseDecodeWithNorms, "apply", lambda *a: calls.append(1) or original(*a))
    clt = make_clt("topk", "auto")
    x, _ = batch()
    clt(x)  # 3 of 64 features: under the crossover
    assert calls == [1]
    assert not DECODE["auto"](torch.ones(4, 4)) and DECODE["auto"](torch.zeros(4, 4))
    assert not DECODE["sparse"](torch.zeros(4, 4, dtype=torch.bfloat16))  # CSR kernels: fp32 / fp64 only
    assert not DECODE["auto"](torch.zeros(4, 4, device="meta"))  # no crossover measured there (CUDA's): dense


def _sharded_rank(rank: int, world: int, name: str) -> None:
    reference = make_clt(name, "dense")
    terms, expected = step(copy.deepcopy(reference), name)
    sharded = FeatureShardedCLT(shard_clt(make_clt(name, "sparse"), rank, world))
    x, y = batch()
    out = sharded(x)
    local, logged = sharded.loss(out, y, **SETTINGS[name][2])
    local.total.backward()
    torch.testing.assert_close({n: getattr(logged, n) for n in terms}, terms, **TOLERANCE)
    cols = feature_slice(F, rank, world)
    for n, p in sharded.local.named_parameters():
        want = expected.get(n)
        if want is None:
            assert p.grad is None, n
            continue
        want = {"W_enc": want[..., cols], "b_enc": want[:, cols], "log_threshold": want[:, cols]}.get(n, want)
        want = want[cols] if n == "W_dec" else want
        torch.testing.assert_close(p.grad, want, **TOLERANCE)
    full_l0 = (reference(x).features != 0).sum()
    l0 = (out.features != 0).sum()
    dist.all_reduce(l0)
    assert l0 == full_l0


@pytest.mark.parametrize("name", ["jumprelu", "topk", "batchtopk"])
def test_sparse_under_feature_sharding_equals_dense_single(name: str) -> None:
    spawn_ranks(_sharded_rank, 2, name)
