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

import torch
from jaxtyping import Float

from clt_forge.clt.model import CLTOutput

__all__ = ["LossTerms", "clt_loss", "layer_metrics"]


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
        sparsity = l0_coefficient * torch.tanh(c * output.features * decoder_norms).sum() / batch
    dead = zero
    if dead_coefficient != 0.0:
        dead = dead_coefficient * (torch.relu(jumprelu_threshold - output.pre_acts) * decoder_norms).sum() / batch
    return LossTerms(total=mse + sparsity + dead, mse=mse, sparsity=sparsity, dead=dead)


@torch.no_grad()
def layer_metrics(output: CLTOutput, target: Float[torch.Tensor, "batch n_layers d_model"]) -> dict[str, torch.Tensor]:
    """Per-layer logging quantities, each [n_layers]: mse (summed over d_model, mean over tokens),
    fvu (mse over the target's variance about its batch mean) and l0 (active features per token)."""
    mse = (output.reconstruction - target).square().sum(-1).mean(0)
    variance = (target - target.mean(0)).square().sum(-1).mean(0)
    l0 = (output.features != 0).sum(-1).to(target.dtype).mean(0)
    return {"mse": mse, "fvu": mse / variance.clamp_min(torch.finfo(variance.dtype).tiny), "l0": l0}
