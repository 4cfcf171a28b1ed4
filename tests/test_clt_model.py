"""CrossLayerTranscoder: decode vs a naive (source, target) loop, causality, decoder views and
norms, the eq.-6 loss terms, encoder-bias init for a target L0, and that training reduces MSE."""

from __future__ import annotations

import math

import pytest
import torch

from clt_forge.clt import CLTOutput, CrossLayerTranscoder, LossTerms, clt_loss, init_encoder_bias, layer_metrics
from clt_forge.clt.init import init_clt
from clt_forge.clt.loss import DeadFeatureTerm, SparsityTerm
from clt_forge.clt.model import _DecodeWithNorms

torch.set_num_threads(2)

N_LAYERS, D_MODEL, D_FEATURES, BATCH = 4, 8, 6, 5


def _model(dtype: torch.dtype = torch.float32, seed: int = 0, **kw) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    model = CrossLayerTranscoder(N_LAYERS, D_MODEL, D_FEATURES, dtype=dtype, **kw)
    with torch.no_grad():  # non-zero biases and a spread of thresholds so every path is exercised
        model.b_dec.normal_()
        model.b_enc.normal_(0.0, 0.1)
        model.log_threshold.uniform_(math.log(0.01), math.log(0.3))
    return model


def _naive_decode(model: CrossLayerTranscoder, z: torch.Tensor) -> torch.Tensor:
    """y_hat[:, t] = b_dec[t] + sum over sources l <= t of z[:, l] @ W_dec[l -> t], pair by pair."""
    batch = z.shape[0]
    out = model.b_dec.expand(batch, -1, -1).clone()
    for source in range(model.n_layers):
        for target in range(source, model.n_layers):
            out[:, target] += z[:, source] @ model.decoder(source)[:, target - source]
    return out


def _naive_norms(model: CrossLayerTranscoder) -> torch.Tensor:
    norms = torch.zeros(model.n_layers, model.d_features, dtype=model.W_dec.dtype)
    for source in range(model.n_layers):
        for f in range(model.d_features):
            vectors = [model.decoder(source)[f, t - source] for t in range(source, model.n_layers)]
            norms[source, f] = torch.cat(vectors).norm()
    return norms


def test_shapes_and_parameters() -> None:
    model = _model()
    n_pairs = N_LAYERS * (N_LAYERS + 1) // 2
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "W_enc": (N_LAYERS, D_MODEL, D_FEATURES),
        "b_enc": (N_LAYERS, D_FEATURES),
        "log_threshold": (N_LAYERS, D_FEATURES),
        "W_dec": (D_FEATURES, n_pairs, D_MODEL),
        "b_dec": (N_LAYERS, D_MODEL),
    }
    x = torch.randn(BATCH, N_LAYERS, D_MODEL)
    out = model(x)
    assert isinstance(out, CLTOutput)
    assert out.pre_acts.shape == out.features.shape == (BATCH, N_LAYERS, D_FEATURES)
    assert out.reconstruction.shape == (BATCH, N_LAYERS, D_MODEL)
    assert out.decoder_norms.shape == (N_LAYERS, D_FEATURES)
    h, z = model.encode(x)
    torch.testing.assert_close(h, torch.einsum("bld,ldf->blf", x, model.W_enc) + model.b_enc)
    theta = model.jumprelu_threshold()
    torch.testing.assert_close(z, torch.where(h > theta, h, torch.zeros_like(h)))
    torch.testing.assert_close(out.features, z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_matches_naive_double_loop(dtype: torch.dtype) -> None:
    model = _model(dtype)
    z = torch.randn(BATCH, N_LAYERS, D_FEATURES, dtype=dtype).relu()
    expected = _naive_decode(model, z)
    torch.testing.assert_close(model.decode(z), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.decode(z, bias=False) + model.b_dec, expected, atol=1e-5, rtol=1e-5)
    x = torch.randn(BATCH, N_LAYERS, D_MODEL, dtype=dtype)
    out = model(x)
    torch.testing.assert_close(out.reconstruction, _naive_decode(model, out.features), atol=1e-5, rtol=1e-5)


def test_decode_gradients_match_autograd_of_naive() -> None:
    """Custom backward (packed GEMMs + fused norm gradient) vs autograd through the naive loops."""
    model = _model(torch.float64)
    z = torch.randn(BATCH, N_LAYERS, D_FEATURES, dtype=torch.float64).relu().requires_grad_()
    w_recon = torch.randn(BATCH, N_LAYERS, D_MODEL, dtype=torch.float64)
    w_norms = torch.randn(N_LAYERS, D_FEATURES, dtype=torch.float64)

    recon, norms = _DecodeWithNorms.apply(z, model.W_dec, model.offsets)
    ((recon * w_recon).sum() + (norms * w_norms).sum()).backward()
    fast = (z.grad.clone(), model.W_dec.grad.clone())
    z.grad = model.W_dec.grad = None
    naive = _naive_decode(model, z) - model.b_dec
    ((naive * w_recon).sum() + (_naive_norms(model) * w_norms).sum()).backward()
    torch.testing.assert_close(fast[0], z.grad)
    torch.testing.assert_close(fast[1], model.W_dec.grad)
    small = CrossLayerTranscoder(3, 3, 2, dtype=torch.float64)  # gradcheck is O(parameters) forwards
    assert torch.autograd.gradcheck(
        lambda z_, w_: _DecodeWithNorms.apply(z_, w_, small.offsets),
        (torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True), small.W_dec.detach().clone().requires_grad_()),
    )


def test_decode_only_gradients_and_unused_norms() -> None:
    """decode() (no norms) and a forward whose norms are unused get the plain decode gradient."""
    model = _model(torch.float64)
    z = torch.randn(BATCH, N_LAYERS, D_FEATURES, dtype=torch.float64).relu()
    w_recon = torch.randn(BATCH, N_LAYERS, D_MODEL, dtype=torch.float64)
    (_naive_decode(model, z) * w_recon).sum().backward()
    expected = model.W_dec.grad.clone()
    model.zero_grad(set_to_none=True)
    (model.decode(z) * w_recon).sum().backward()
    torch.testing.assert_close(model.W_dec.grad, expected)
    model.zero_grad(set_to_none=True)
    x = torch.randn(BATCH, N_LAYERS, D_MODEL, dtype=torch.float64)
    out = model(x)
    (out.reconstruction * w_recon).sum().backward()
    grad_fast = model.W_dec.grad.clone()
    model.zero_grad(set_to_none=True)
    (_naive_decode(model, model.encode(x)[1]) * w_recon).sum().backward()
    torch.testing.assert_close(grad_fast, model.W_dec.grad)


def test_gradient_buffer_reuse_keeps_accumulation_and_held_gradients_correct() -> None:
    model = _model()
    x = torch.randn(BATCH, N_LAYERS, D_MODEL)
    y = torch.randn(BATCH, N_LAYERS, D_MODEL)

    def backward() -> None:
        out = model(x)
        clt_loss(out, y, out.decoder_norms, model.jumprelu_threshold(), l0_coefficient=0.1).total.backward()

    backward()
    once = model.W_dec.grad.clone()
    first_ptr = model.W_dec.grad.data_ptr()
    model.zero_grad(set_to_none=True)
    backward()
    assert model.W_dec.grad.data_ptr() == first_ptr  # the storage was reused, not reallocated
    torch.testing.assert_close(model.W_dec.grad, once)
    backward()  # accumulate without zeroing: the live gradient must not be overwritten
    torch.testing.assert_close(model.W_dec.grad, 2 * once)
    held = model.W_dec.grad
    model.zero_grad(set_to_none=True)
    backward()  # someone still holds the old gradient: it must keep its values
    torch.testing.assert_close(held, 2 * once)
    torch.testing.assert_close(model.W_dec.grad, once)
    model.grad_buffer = None  # opting out allocates afresh and gives the same gradient
    model.zero_grad(set_to_none=True)
    backward()
    torch.testing.assert_close(model.W_dec.grad, once)


def test_causality_forward_and_gradients() -> None:
    """Layer l's inputs and features never reach targets < l, before or after optimizer steps."""
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(BATCH, N_LAYERS, D_MODEL)
    y = torch.randn(BATCH, N_LAYERS, D_MODEL)
    for _ in range(3):  # a few steps first: causality must hold for a trained model too
        out = model(x)
        clt_loss(out, y, out.decoder_norms, model.jumprelu_threshold(), l0_coefficient=0.1).total.backward()
        optimizer.step()
        optimizer.zero_grad()
    for layer in range(1, N_LAYERS):
        x2 = x.clone()
        x2[:, layer] += torch.randn(BATCH, D_MODEL) * 10
        before, after = model(x).reconstruction, model(x2).reconstruction
        torch.testing.assert_close(after[:, :layer], before[:, :layer], rtol=0, atol=0)
        assert not torch.allclose(after[:, layer:], before[:, layer:])
    for target in range(N_LAYERS):
        model.zero_grad(set_to_none=True)
        z = model.encode(x)[1].detach().requires_grad_()
        model.decode(z)[:, target].square().sum().backward()
        assert torch.all(z.grad[:, target + 1 :] == 0)
        for source in range(N_LAYERS):
            grad = model.W_dec.grad[:, model.offsets[source] : model.offsets[source + 1]]
            for t in range(source, N_LAYERS):
                assert torch.any(grad[:, t - source] != 0) == (t == target)
    # Packed layout: there are no target < source decoder entries at all to leak through.
    assert model.W_dec.numel() == D_FEATURES * D_MODEL * N_LAYERS * (N_LAYERS + 1) // 2


def test_decoder_view_shape_and_content() -> None:
    model = _model()
    for source in range(N_LAYERS):
        block = model.decoder(source)
        assert block.shape == (D_FEATURES, N_LAYERS - source, D_MODEL)
        assert block.data_ptr() == model.W_dec[:, model.offsets[source]].data_ptr()  # a view, no copy
        # decoding a one-hot feature of this source layer writes exactly block[f] to targets >= source
        f = source % D_FEATURES
        z = torch.zeros(1, N_LAYERS, D_FEATURES)
        z[0, source, f] = 1.0
        written = model.decode(z, bias=False)[0]
        torch.testing.assert_close(written[source:], block[f])
        assert torch.all(written[:source] == 0)
    with pytest.raises(IndexError):
        model.decoder(N_LAYERS)


def test_decoder_norms_match_naive() -> None:
    model = _model()
    torch.testing.assert_close(model.decoder_norms(), _naive_norms(model))
    out = model(torch.randn(BATCH, N_LAYERS, D_MODEL))
    torch.testing.assert_close(out.decoder_norms, _naive_norms(model))


def test_loss_terms_match_naive_formulas() -> None:
    model = _model(torch.float64)
    x = torch.randn(BATCH, N_LAYERS, D_MODEL, dtype=torch.float64)
    y = torch.randn(BATCH, N_LAYERS, D_MODEL, dtype=torch.float64)
    out = model(x)
    norms, theta = model.decoder_norms(), model.jumprelu_threshold()
    lam0, c, lam1 = 0.7, 2.5, 0.3
    terms = clt_loss(out, y, norms, theta, l0_coefficient=lam0, c=c, dead_coefficient=lam1)
    assert isinstance(terms, LossTerms)
    mse = sparsity = dead = 0.0
    out_, norms_, theta_ = (
        CLTOutput(*(t.detach() for t in (out.pre_acts, out.features, out.reconstruction, out.decoder_norms))),
        norms.detach(),
        theta.detach(),
    )
    for b in range(BATCH):
        for layer in range(N_LAYERS):
            mse += float(((out_.reconstruction[b, layer] - y[b, layer]) ** 2).sum())
            for f in range(D_FEATURES):
                n = float(norms_[layer, f])
                sparsity += math.tanh(c * float(out_.features[b, layer, f]) * n)
                dead += max(float(theta_[layer, f]) - float(out_.pre_acts[b, layer, f]), 0.0) * n
    assert terms.mse.item() == pytest.approx(mse / BATCH, rel=1e-10)
    assert terms.sparsity.item() == pytest.approx(lam0 * sparsity / BATCH, rel=1e-10)
    assert terms.dead.item() == pytest.approx(lam1 * dead / BATCH, rel=1e-10)
    assert terms.total.item() == pytest.approx((mse + lam0 * sparsity + lam1 * dead) / BATCH, rel=1e-10)
    assert all(t.dim() == 0 for t in (terms.total, terms.mse, terms.sparsity, terms.dead))
    # the fused norms in the forward give the same loss and the same gradients as decoder_norms()
    fused = clt_loss(out, y, out.decoder_norms, theta, l0_coefficient=lam0, c=c, dead_coefficient=lam1)
    torch.testing.assert_close(fused.total, terms.total)
    grads = torch.autograd.grad(terms.total, list(model.parameters()), retain_graph=True)
    grads_fused = torch.autograd.grad(fused.total, list(model.parameters()))
    for a, b in zip(grads, grads_fused, strict=True):
        torch.testing.assert_close(a, b)
    metrics = layer_metrics(out, y)
    assert set(metrics) == {"mse", "fvu", "l0"} and all(v.shape == (N_LAYERS,) for v in metrics.values())
    torch.testing.assert_close(metrics["mse"].sum(), terms.mse)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dead_feature_term_matches_its_composed_formula(dtype: torch.dtype) -> None:
    """DeadFeatureTerm has the value and gradients of sum(ReLU(theta - h) * norms) built from
    torch ops, ties h = theta included (ReLU's gradient 0 there), on h as the encoder lays it out
    ([B, L, F] view of [L, B, F]); gradcheck in float64."""
    generator = torch.Generator().manual_seed(5)
    h = torch.randn(N_LAYERS, BATCH, D_FEATURES, generator=generator, dtype=dtype).permute(1, 0, 2)
    theta = torch.rand(N_LAYERS, D_FEATURES, generator=generator, dtype=dtype)
    norms = torch.rand(N_LAYERS, D_FEATURES, generator=generator, dtype=dtype)
    inputs = [t.clone().requires_grad_() for t in (h, theta, norms)]
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(DeadFeatureTerm.apply, inputs)
    with torch.no_grad():
        inputs[0][:, 0, 0] = inputs[1][0, 0]  # every token exactly at layer 0 feature 0's threshold
    composed = (torch.relu(inputs[1] - inputs[0]) * inputs[2]).sum()
    expected = torch.autograd.grad(composed, inputs)
    value = DeadFeatureTerm.apply(*inputs)
    torch.testing.assert_close(value, composed)
    for got, want in zip(torch.autograd.grad(value, inputs), expected, strict=True):
        torch.testing.assert_close(got, want)
    assert expected[1][0, 0] == 0  # the ties contribute no gradient in either


def test_init_scales() -> None:
    torch.manual_seed(0)
    model = CrossLayerTranscoder(3, 64, 256, jumprelu_threshold=0.05)
    assert model.W_enc.abs().max() <= 1 / math.sqrt(256)
    assert model.W_enc.abs().max() > 0.9 / math.sqrt(256)
    assert model.W_dec.abs().max() <= 1 / math.sqrt(3 * 64)
    assert model.W_dec.abs().max() > 0.9 / math.sqrt(3 * 64)
    assert torch.all(model.b_dec == 0) and torch.all(model.b_enc == 0)
    torch.testing.assert_close(model.jumprelu_threshold(), torch.full((3, 256), 0.05))


def test_decoder_tied_encoder_init_reads_what_each_feature_writes_and_shards_alike() -> None:
    n_layers, d_model, d_features = 3, 16, 300  # two seeded init blocks of 256
    full = CrossLayerTranscoder(n_layers, d_model, d_features, init=False)
    untied = CrossLayerTranscoder(n_layers, d_model, d_features, init=False)
    init_clt(full, seed=7, encoder="decoder")
    init_clt(untied, seed=7)
    torch.testing.assert_close(full.W_dec, untied.W_dec)  # the decoders are untouched
    norms = lambda m: torch.linalg.vector_norm(m.W_enc, dim=1)  # noqa: E731  [L, F]
    torch.testing.assert_close(norms(full), norms(untied))  # each column keeps its norm
    for layer in range(n_layers):
        cosine = torch.nn.functional.cosine_similarity(full.W_enc[layer].t(), full.W_dec[:, full.offsets[layer]], dim=1)
        torch.testing.assert_close(cosine, torch.ones(d_features))
    shard = CrossLayerTranscoder(n_layers, d_model, 100, init=False)
    init_clt(shard, seed=7, features=slice(200, 300), d_features=d_features, encoder="decoder")
    torch.testing.assert_close(shard.W_enc, full.W_enc[..., 200:300])
    with pytest.raises(ValueError, match="init_encoder='sideways'"):
        init_clt(shard, encoder="sideways")


@pytest.mark.parametrize(("d_features", "target_l0"), [(512, 16.0), (64, 5.5), (4, 0.5), (3, 2.0), (2, 5.0), (1, 1.0)])
def test_init_encoder_bias_hits_target_l0(d_features: int, target_l0: float) -> None:
    torch.manual_seed(1)
    n_layers, d_model = 3, 32
    model = CrossLayerTranscoder(n_layers, d_model, d_features)
    # layers of different scales, so one global bias would not do
    scale = torch.tensor([0.5, 1.0, 3.0])[None, :, None]
    x = torch.randn(1024, n_layers, d_model) * scale
    init_encoder_bias(model, x, target_l0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        l0 = (model(x).features != 0).sum(-1).float().mean(0)  # per layer
    expected = float(min(target_l0, d_features))
    torch.testing.assert_close(l0, torch.full((n_layers,), expected), atol=expected * 0.01 + 1e-3, rtol=0)
    if target_l0 >= d_features:
        assert torch.all(model(x).features != 0)
    # on a fresh batch of the same distribution it stays within ~10%
    with torch.no_grad():
        held_out = (model(torch.randn(4096, n_layers, d_model) * scale).features != 0).sum(-1).float().mean(0)
    assert torch.all((held_out - expected).abs() <= 0.1 * expected + 0.05)


def test_adam_steps_reduce_mse_on_synthetic_data() -> None:
    """Random sparse features through a random decoder: a few Adam steps cut the MSE."""
    torch.manual_seed(2)
    n_layers, d_model, d_features, batch = 3, 16, 32, 128
    true_features = torch.rand(batch, n_layers, d_features) * (torch.rand(batch, n_layers, d_features) < 0.1)
    read = torch.randn(n_layers, d_features, d_model) / math.sqrt(d_features * 0.1)
    x = torch.einsum("blf,lfd->bld", true_features, read) + 0.01 * torch.randn(batch, n_layers, d_model)
    teacher = CrossLayerTranscoder(n_layers, d_model, d_features)
    with torch.no_grad():
        teacher.W_dec.normal_(0.0, 0.3)
        y = teacher.decode(true_features)
    model = CrossLayerTranscoder(n_layers, d_model, d_features)
    init_encoder_bias(model, x, target_l0=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    mses = []
    for _ in range(40):
        out = model(x)
        terms = clt_loss(
            out, y, out.decoder_norms, model.jumprelu_threshold(), l0_coefficient=1e-3, dead_coefficient=1e-5
        )
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
        mses.append(terms.mse.item())
    assert all(math.isfinite(m) for m in mses)
    assert mses[-1] < 0.5 * mses[0]


@pytest.mark.parametrize("bandwidth", [1.0, 0.05])
def test_bf16_autocast_matches_fp32(bandwidth: float) -> None:
    """Under CPU autocast the packed decode runs in bf16 (like nn.Linear) and gradients stay fp32.
    With the default STE bandwidth (0.05) bf16's rounding of h moves tokens across the narrow
    window's edges, so theta's gradient (from the few tokens inside it) is checked loosely there."""
    torch.manual_seed(3)
    model = CrossLayerTranscoder(3, 16, 8, bandwidth=bandwidth)
    x = torch.randn(64, 3, 16)

    def grads(autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
            terms = clt_loss(out, x, out.decoder_norms, model.jumprelu_threshold(), 0.1, dead_coefficient=0.01)
        terms.total.backward()
        return terms.total.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    loss32, grads32 = grads(False)
    loss16, grads16 = grads(True)
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)
    for name, grad in grads32.items():
        assert grads16[name].dtype == torch.float32
        tolerance = 0.3 if name == "log_threshold" and bandwidth < 1 else 3e-2
        assert (grads16[name] - grad).norm() <= tolerance * grad.norm(), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["encoder", "contiguous"])
def test_sparsity_term_equals_the_composed_formula(dtype: torch.dtype, layout: str) -> None:
    """SparsityTerm has the value and gradients of sum(tanh(c * z * norms)) built from torch ops, on
    z as the encoder lays it out ([B, L, F] view of [L, B, F]) and on a contiguous z, with zeros in z
    (where its z gradient is c * norms); gradcheck in float64."""
    generator = torch.Generator().manual_seed(6)
    z = torch.relu(torch.randn(N_LAYERS, BATCH, D_FEATURES, generator=generator, dtype=dtype)).permute(1, 0, 2)
    z = z.contiguous() if layout == "contiguous" else z
    norms = torch.rand(N_LAYERS, D_FEATURES, generator=generator, dtype=dtype) + 0.5
    inputs = [t.clone().requires_grad_() for t in (z, norms)]
    assert (z == 0).any() and (z != 0).any()
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda z, n: SparsityTerm.apply(z, n, 1.7), inputs)
    composed = torch.tanh(1.7 * inputs[0] * inputs[1]).sum()
    expected = torch.autograd.grad(composed, inputs)
    value = SparsityTerm.apply(*inputs, 1.7)
    torch.testing.assert_close(value, composed)
    got = torch.autograd.grad(value, inputs)
    for grad, want in zip(got, expected, strict=True):
        torch.testing.assert_close(grad, want)
    assert got[0].shape == z.shape
