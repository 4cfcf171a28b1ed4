"""The CLT training loss (Sparse-CLT paper eq. 6 plus Anthropic's Jan-2025 pre-activation term).

The one job of this file: turn one forward pass into the scalar loss terms, as pure functions
with no state, so a sharded wrapper can compute each term on its shard and reduce it.

Normalisation (B tokens in the batch, sums over everything else):

    mse      = (1/B) sum_b sum_{t, d} (y_hat[b, t, d] - y[b, t, d])^2
               i.e. summed over target layers and d_model, averaged over tokens
    sparsity = l0_coefficient * (1/B) sum_b sum_{l, f} tanh(c * z[b, l, f] * ||W_dec[l, f]||)
    dead     = dead_coefficient * (1/B) sum_b sum_{l, f} ReLU(theta[l, f] - h[b, l, f]) * ||W_dec[l, f]||
    total    = mse + sparsity + dead

where ||W_dec[l, f]|| is the norm of feature f of layer l's decoder vectors concatenated over
its target layers (`CrossLayerTranscoder.decoder_norms`, or `CLTOutput.decoder_norms`),
theta = exp(log_threshold) the JumpReLU threshold and h the pre-activations. The dead term
pushes the pre-activations of features that never fire up toward their threshold. Gradients
flow through every factor, as in the formulas. An activation that fixes the number of active
features (TopK, BatchTopK: `CLTOutput.l0_penalty` False) has no sparsity term whatever the
l0_coefficient (its schedule does not apply); its theta is an estimate, not trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from clt_forge.clt.model import CLTOutput

__all__ = ["DeadFeatureTerm", "LossTerms", "SparsityTerm", "clt_loss", "layer_metrics"]


@dataclass
class LossTerms:
    """Scalar tensors; `total` is the one to backpropagate."""

    total: Float[torch.Tensor, ""]
    mse: Float[torch.Tensor, ""]
    sparsity: Float[torch.Tensor, ""]
    dead: Float[torch.Tensor, ""]


def clt_loss(
    output: CLTOutput,
    target: Float[torch.Tensor, "batch n_layers d_model"],
    decoder_norms: Float[torch.Tensor, "n_layers d_features"],
    jumprelu_threshold: Float[torch.Tensor, "n_layers d_features"],
    l0_coefficient: float,
    c: float = 1.0,
    dead_coefficient: float = 0.0,
) -> LossTerms:
    """The three loss terms and their sum for one batch (see the module docstring)."""
    batch = target.shape[0]
    mse = (output.reconstruction - target).square().sum() / batch
    zero = mse.new_zeros(())
    sparsity = zero
    if l0_coefficient != 0.0 and output.l0_penalty:
        sparsity = l0_coefficient * SparsityTerm.apply(output.features, decoder_norms, c) / batch
    dead = zero
    if dead_coefficient != 0.0:
        dead = dead_coefficient * DeadFeatureTerm.apply(output.pre_acts, jumprelu_threshold, decoder_norms) / batch
    return LossTerms(total=mse + sparsity + dead, mse=mse, sparsity=sparsity, dead=dead)


class SparsityTerm(torch.autograd.Function):
    """sum_{b, l, f} tanh(c * z[b, l, f] * ||W_dec[l, f]||), with the gradients autograd gives it,
    computed in [L, B, F] order (z's storage order: `CrossLayerTranscoder.encode` makes z a
    [B, L, F] view of [L, B, F] storage). On CPU, torch's elementwise ops that broadcast an [L, F]
    tensor over a leading batch dim, or read the stride-0 gradient of a sum, ran 5-8x slower than
    the same ops over [L, B, F] with [L, 1, F] (44 against 8 ms per pass at issue 18's shape;
    docs/performance.md)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, norms: torch.Tensor, c: float) -> torch.Tensor:
        t = torch.tanh(z.transpose(0, 1) * (c * norms)[:, None, :])  # [L, B, F]
        ctx.save_for_backward(z, norms, t)
        ctx.c = c
        return t.sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, norms, t = ctx.saved_tensors
        slope = t.square().neg_().add_(1)  # d tanh(u) / du = 1 - tanh(u)^2
        grad_z = grad_norms = None
        if ctx.needs_input_grad[0]:
            grad_z = (slope * (grad * ctx.c * norms)[:, None, :]).transpose(0, 1)
        if ctx.needs_input_grad[1]:
            grad_norms = (slope * z.transpose(0, 1)).sum(1) * (grad * ctx.c)
        return grad_z, grad_norms, None


class DeadFeatureTerm(torch.autograd.Function):
    """sum_{b, l, f} ReLU(theta[l, f] - h[b, l, f]) * ||W_dec[l, f]||, with the gradients autograd
    gives it (ReLU's is 0 at h = theta). It makes one [B, L, F] temporary forward and a mask plus
    grad h backward; composed from torch ops the term made five [B, L, F] tensors, each a pass
    over 141 MB at issue 18's shape (docs/performance.md, "Sparse decode")."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, theta: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        below = (theta - h).clamp_min_(0).sum(0)  # [L, F]: sum over the batch of ReLU(theta - h)
        ctx.save_for_backward(h, theta, norms, below)
        return (below * norms).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, theta, norms, below = ctx.saved_tensors
        grad_h = grad_theta = grad_norms = None
        scaled = grad * norms  # d term / d ReLU(theta - h), the same for every token
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            under = h < theta  # where ReLU(theta - h) has slope 1
            if ctx.needs_input_grad[0]:
                grad_h = under * scaled.neg()
            if ctx.needs_input_grad[1]:
                grad_theta = under.sum(0, dtype=theta.dtype) * scaled
        if ctx.needs_input_grad[2]:
            grad_norms = grad * below
        return grad_h, grad_theta, grad_norms


@torch.no_grad()
def layer_metrics(output: CLTOutput, target: Float[torch.Tensor, "batch n_layers d_model"]) -> dict[str, torch.Tensor]:
    """Per-layer logging quantities, each [n_layers]: mse (summed over d_model, mean over tokens),
    fvu (mse over the target's variance about its batch mean) and l0 (active features per token)."""
    mse = (output.reconstruction - target).square().sum(-1).mean(0)
    variance = (target - target.mean(0)).square().sum(-1).mean(0)
    l0 = (output.features != 0).sum(-1).to(target.dtype).mean(0)
    return {"mse": mse, "fvu": mse / variance.clamp_min(torch.finfo(variance.dtype).tiny), "l0": l0}
