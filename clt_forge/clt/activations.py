"""The CLT's activation functions, one registry keyed by `clt.activation`.

The one job of this file: turn pre-activations h [B, L, F] into features z [B, L, F], and say
where the decode's backward must compute grad z (`Activated.grad_needed`) so the sparse decode
(clt_forge/clt/decode.py) can skip the rest exactly. A new activation is one registered subclass
of `Activation`.

    jumprelu   z = h * H(h - theta), theta = exp(log_threshold) learned with the STE
               (clt_forge/clt/jumprelu.py); grad z is needed where z != 0 and, while theta
               learns, inside the STE window |h - theta| < bandwidth / 2.
    topk       z = ReLU(h) on the k largest h of each (token, layer), over all F features.
    batchtopk  z = ReLU(h) on the k * B largest h of each layer over the whole batch (Bussmann
               et al. 2024); in eval mode z = JumpReLU(h, theta) with the estimated theta, which
               is batch-independent, as the BatchTopK paper does at inference.

TopK and BatchTopK need no L0 penalty (`l0_penalty = False`: the loss skips the sparsity term and
its schedule) and do not learn theta by gradient (log_threshold has requires_grad False). Instead
each training forward estimates it as the paper does: per layer, an exponential moving average
(momentum `threshold_momentum`) of the smallest activation kept in the batch, written into every
feature of that layer's log_threshold (TopK: the mean over tokens of each token's smallest kept
activation, its per-token cutoff). That makes the checkpoint a JumpReLU CLT with learned
thresholds, which is what circuit-tracer loads (clt_forge/attribution/convert.py).

Feature sharding: a rank holds only its slice of F, so the cutoffs need every rank's candidates.
`gather` concatenates a tensor along its last dim across the ranks (identity on one device); the
k-th largest value of the gathered per-rank top-k equals the k-th largest over all features, so a
sharded forward keeps exactly the entries the unsharded one keeps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float

from clt_forge.clt.jumprelu import jumprelu
from clt_forge.registry import Registry

if TYPE_CHECKING:
    from clt_forge.clt.model import CrossLayerTranscoder

__all__ = ["ACTIVATIONS", "Activated", "Activation", "Gather", "make_activation"]

Gather = Callable[[torch.Tensor], torch.Tensor]  # concatenates along the last dim across feature shards


def _no_gather(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class Activated:
    """Features and where their gradient is needed (None: everywhere, e.g. under no_grad)."""

    features: Float[torch.Tensor, "batch n_layers d_features"]
    grad_needed: Bool[torch.Tensor, "batch n_layers d_features"] | None


class Activation:
    """Base class: `__call__(h, clt, gather)` -> Activated. Subclasses set the class flags."""

    l0_penalty = True  # the tanh L0 term and its schedule apply
    learns_threshold = True  # log_threshold is trained by gradient (else estimated in the forward)

    def __init__(self, k: int = 0) -> None:
        self.k = k

    def __call__(
        self, h: Float[torch.Tensor, "batch n_layers d_features"], clt: CrossLayerTranscoder, gather: Gather | None
    ) -> Activated:
        raise NotImplementedError


ACTIVATIONS: Registry[type[Activation]] = Registry("clt.activation")


def make_activation(name: str, k: int = 0) -> Activation:
    """The activation `name` with its settings checked (ConfigError / ValueError naming the fix)."""
    return ACTIVATIONS.lookup(name)(k=k)


@ACTIVATIONS.register("jumprelu")
class JumpReLU(Activation):
    """Today's activation: learned thresholds, straight-through gradients (see jumprelu.py)."""

    def __call__(self, h: torch.Tensor, clt: CrossLayerTranscoder, gather: Gather | None) -> Activated:
        # In [L, B, F] order, h's storage order: torch's CPU ops that broadcast theta [L, F] over a
        # leading batch dim run 5x slower (loss.SparsityTerm)
        h_t, theta = h.transpose(0, 1), clt.jumprelu_threshold()[:, None, :]
        z = jumprelu(h_t, theta, clt.bandwidth).transpose(0, 1)
        if not torch.is_grad_enabled():
            return Activated(z, None)
        if not theta.requires_grad:
            return Activated(z, z != 0)
        # theta's STE reads grad z inside its window too, active or not: the active entries (h > theta)
        # with the window (|h - theta| / eps < 1/2) are exactly (h - theta) / eps > -1/2, one pass
        return Activated(z, ((h_t.detach() - theta.detach()) / clt.bandwidth > -0.5).transpose(0, 1))


class _Selecting(Activation):
    """TopK-style: keep a number of the largest pre-activations, estimate theta for inference."""

    l0_penalty = False
    learns_threshold = False
    threshold_momentum = 0.99

    def __init__(self, k: int = 0) -> None:
        if k < 1:
            raise ValueError(f"clt.k={k}: the {type(self).__name__} activation keeps k features; set clt.k >= 1")
        super().__init__(k)

    def select(self, h: torch.Tensor, gather: Gather) -> tuple[torch.Tensor, torch.Tensor]:
        """(cutoff, broadcastable to h: the positive h >= cutoff are kept; the candidates: the
        largest values over every shard, among which each group's kept values all are)."""
        raise NotImplementedError

    def __call__(self, h: torch.Tensor, clt: CrossLayerTranscoder, gather: Gather | None) -> Activated:
        with torch.no_grad():
            cutoff, candidates = self.select(h.detach(), gather or _no_gather)
            kept = h.detach() > _just_below(cutoff)  # h >= cutoff and h > 0, in one pass over h
        z = torch.where(kept, h, 0.0)
        if clt.training and torch.is_grad_enabled():
            self.update_threshold(candidates, clt)
        return Activated(z, kept if torch.is_grad_enabled() else None)

    def batch_threshold(self, candidates: torch.Tensor) -> torch.Tensor:
        """This batch's threshold per layer [L] (inf where a layer kept nothing): the smallest
        activation kept, over the batch and every shard (the BatchTopK paper's estimate)."""
        return _smallest_positive(candidates)

    @torch.no_grad()
    def update_threshold(self, candidates: torch.Tensor, clt: CrossLayerTranscoder) -> None:
        """theta_l <- m theta_l + (1 - m) batch_threshold_l, per layer, the same on every rank."""
        smallest = self.batch_threshold(candidates)
        theta = clt.log_threshold.exp()
        found = torch.isfinite(smallest)[:, None]  # a layer that kept nothing keeps its theta
        m = self.threshold_momentum
        updated = m * theta + (1 - m) * smallest[:, None].to(theta.dtype)
        clt.log_threshold.copy_(torch.where(found, updated.log(), clt.log_threshold))


def _just_below(cutoff: torch.Tensor) -> torch.Tensor:
    """The largest float below a positive cutoff, else 0: h > it <=> h >= cutoff and h > 0.
    In float32 at least, so a bf16 h compares exactly (its values are float32 values too)."""
    cutoff = cutoff.to(torch.promote_types(cutoff.dtype, torch.float32))
    below = torch.nextafter(cutoff, cutoff.new_tensor(-math.inf))
    return torch.where(cutoff > 0, below, torch.zeros_like(below))


def _smallest_positive(candidates: torch.Tensor) -> torch.Tensor:
    """The smallest positive value along the last dim (inf where there is none)."""
    return torch.where(candidates > 0, candidates, torch.full_like(candidates, math.inf)).amin(-1)


def _largest(values: torch.Tensor, k: int, gather: Gather) -> tuple[torch.Tensor, torch.Tensor]:
    """(the k-th largest entry of `values` along its last dim across all shards, -inf if fewer;
    the k largest themselves, all of them if fewer)."""
    local = values.topk(min(k, values.shape[-1]), dim=-1).values
    everywhere = gather(local)
    if everywhere.shape[-1] < k:
        return torch.full_like(everywhere[..., :1], -math.inf), everywhere
    top = everywhere.topk(k, dim=-1).values
    return top[..., -1:], top


@ACTIVATIONS.register("topk")
class TopK(_Selecting):
    """k features per layer per token (Gao et al. 2024), over all of the layer's features."""

    def select(self, h: torch.Tensor, gather: Gather) -> tuple[torch.Tensor, torch.Tensor]:
        return _largest(h, self.k, gather)  # per (token, layer): [B, L, 1], [B, L, k]

    def batch_threshold(self, candidates: torch.Tensor) -> torch.Tensor:
        """Per layer, the mean over tokens of each token's smallest kept activation (its cutoff):
        the batch minimum would sit at the lowest token's cutoff and keep far more than k."""
        per_token = _smallest_positive(candidates)  # [B, L]
        found = torch.isfinite(per_token)
        total = torch.where(found, per_token, torch.zeros_like(per_token)).sum(0)
        count = found.sum(0)
        return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.inf))


@ACTIVATIONS.register("batchtopk")
class BatchTopK(_Selecting):
    """k x batch features per layer over the whole batch; theta alone in eval mode."""

    def select(self, h: torch.Tensor, gather: Gather) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n_layers, _ = h.shape
        per_layer = h.transpose(0, 1).reshape(n_layers, -1)  # [L, B F]
        cutoff, top = _largest(per_layer, self.k * batch, gather)  # [L, 1], [L, k B]
        return cutoff.view(1, n_layers, 1), top

    def __call__(self, h: torch.Tensor, clt: CrossLayerTranscoder, gather: Gather | None) -> Activated:
        if clt.training:
            return super().__call__(h, clt, gather)
        kept = h > clt.log_threshold.exp()
        return Activated(h * kept.to(h.dtype), kept if torch.is_grad_enabled() else None)
