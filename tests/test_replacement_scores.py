"""The replacement model's KL and top-1 agreement, checked against independent computations."""

from __future__ import annotations

import pytest
import torch

from clt_forge.artifacts.normalization import Normalization
from clt_forge.clt.init import init_clt
from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.evaluation.replacement import replacement_scores


def random_clt(
    model, d_features: int = 16, seed: int = 0, skip: bool = False
) -> tuple[CrossLayerTranscoder, Normalization]:
    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    clt = CrossLayerTranscoder(n_layers, d_model, d_features, skip=skip)
    init_clt(clt, jumprelu_threshold=0.05, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        clt.W_dec.mul_(3.0)
        clt.b_enc.fill_(0.1)
        if clt.W_skip is not None:
            clt.W_skip.normal_(0, 0.5 / d_model**0.5, generator=torch.Generator().manual_seed(seed + 1))
    scale = torch.full((n_layers,), 0.5)
    return clt, Normalization(scale, scale * 2)


def windows(model, n: int = 3, length: int = 12) -> torch.Tensor:
    tokens = torch.randint(1, model.cfg.d_vocab, (n, length), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = model.tokenizer.bos_token_id
    return tokens


def kl_top1(clean: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    clean, other = clean[:, 1:].log_softmax(-1), other[:, 1:].log_softmax(-1)
    kl = (clean.exp() * (clean - other)).sum(-1).mean()
    return float(kl), float((clean.argmax(-1) == other.argmax(-1)).double().mean())


def test_a_zero_clt_is_zero_ablation_of_the_mlps_after_bos(tiny_model):
    clt, norm = random_clt(tiny_model)
    with torch.no_grad():
        clt.W_dec.zero_()
    tokens = windows(tiny_model)

    def zero(value, hook):
        value[:, 1:] = 0
        return value

    n_layers = tiny_model.cfg.n_layers
    ablated = tiny_model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{i}.hook_mlp_out", zero) for i in range(n_layers)])
    kl, top1 = kl_top1(tiny_model(tokens), ablated)
    scores = replacement_scores(tiny_model, clt, norm, tokens, batch_size=2)
    assert kl > 1e-5  # the ablation changes something, so the comparison means something
    assert abs(scores.kl - kl) < 1e-4 * max(1.0, kl) and abs(scores.top1 - top1) < 1e-9
    assert scores.positions == tokens.shape[0] * (tokens.shape[1] - 1)


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_all_layers_replaced_is_the_fixed_point_of_the_clt_forward(tiny_model, skip):
    """Independent path: record the replaced run's MLP inputs, feed them through clt.forward (the
    training path, all layers at once) and patch those reconstructions in: the same logits."""
    clt, norm = random_clt(tiny_model, skip=skip)
    clt.eval()
    tokens = windows(tiny_model)
    scores = replacement_scores(tiny_model, clt, norm, tokens, per_layer=False)
    n_layers = tiny_model.cfg.n_layers
    # Iterate the map "run with outputs from the CLT of the last run's inputs" to its fixed point:
    # layer l's output depends only on inputs <= l, so n_layers + 1 rounds reach it exactly.
    recon = None
    for _ in range(n_layers + 1):
        inputs: dict[int, torch.Tensor] = {}

        def hook_for(layer, recon=recon, inputs=inputs):
            def hook(module, args, output):
                inputs[layer] = args[0][:, 1:].detach()
                if recon is None:
                    return output
                patched = output.clone()
                patched[:, 1:] = recon[:, :, layer]
                return patched

            return hook

        handles = [tiny_model.blocks[i].mlp.register_forward_hook(hook_for(i)) for i in range(n_layers)]
        try:
            logits = tiny_model(tokens)
        finally:
            for h in handles:
                h.remove()
        x = torch.stack([inputs[i] for i in range(n_layers)], dim=2)  # [batch, pos - 1, L, D]
        with torch.no_grad():
            out = clt(norm.inputs(x.flatten(0, 1)))
        y = out.reconstruction * norm.out_scale[:, None]
        recon = y.view(*x.shape)
    kl, top1 = kl_top1(tiny_model(tokens), logits)
    assert kl > 1e-5
    assert abs(scores.kl - kl) < 1e-4 * max(1.0, kl) and abs(scores.top1 - top1) < 1e-9


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_one_layer_replaced_uses_the_original_runs_features(tiny_model, skip):
    clt, norm = random_clt(tiny_model, skip=skip)
    clt.eval()
    tokens = windows(tiny_model)
    scores = replacement_scores(tiny_model, clt, norm, tokens)
    n_layers = tiny_model.cfg.n_layers
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        tiny_model.blocks[i].mlp.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0][:, 1:]))
        for i in range(n_layers)
    ]
    clean = tiny_model(tokens)
    for h in handles:
        h.remove()
    x = torch.stack([inputs[i] for i in range(n_layers)], dim=2)
    with torch.no_grad():
        y = clt(norm.inputs(x.flatten(0, 1))).reconstruction
    recon = (y * norm.out_scale[:, None]).view(*x.shape)
    for layer in range(n_layers):

        def patch(value, hook, layer=layer):
            value[:, 1:] = recon[:, :, layer]
            return value

        patched = tiny_model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", patch)])
        kl, top1 = kl_top1(clean, patched)
        assert abs(scores.layer_kl[layer] - kl) < 1e-4 * max(1.0, kl)
        assert abs(scores.layer_top1[layer] - top1) < 1e-9
    assert scores.worst_layers(1) == [max(range(n_layers), key=lambda i: scores.layer_kl[i])]


def test_a_clt_at_other_hooks_than_the_mlps_is_refused(tiny_model):
    import pytest

    from clt_forge.errors import CLTError

    clt, norm = random_clt(tiny_model)
    with pytest.raises(CLTError, match="reads hook_resid_mid and writes hook_mlp_out"):
        replacement_scores(tiny_model, clt, norm, windows(tiny_model), hooks=("hook_resid_mid", "hook_mlp_out"))
