"""Feature sharding (the paper's scheme), applied from outside the plain CLT module.

Each rank owns a contiguous slice of every layer's features: its rows of W_enc (columns here,
W_enc is [L, D, F]), b_enc, log_threshold and W_dec; b_dec (and W_skip) are replicated. A rank encodes and
decodes with its slice only, and the partial reconstructions are summed across ranks.

Gradients. The loss every rank computes is `mse(global reconstruction) + its own sparsity and
dead-feature terms`. The sum of partial reconstructions is an all-reduce whose backward is the
identity: d mse / d partial_r = d mse / d reconstruction, which every rank already holds in
full (the targets and the reconstruction are replicated). An autograd all-reduce in the
backward as well would multiply every gradient by the world size (a bug this design avoids).
A rank's sparsity and dead terms depend only on its own parameters, so their gradients are
local and exact. Activations that rank all of a layer's features (TopK, BatchTopK) see every
rank's candidates through `all_gather_last` (no gradient: it only picks the cutoff), so each rank
keeps exactly its slice of the unsharded CLT's active set; the sparse decode then runs on each
rank's active slice. b_dec's and W_skip's gradients come from the replicated mse and are equal on every
rank (the skip term, like b_dec, is added once, after the all-reduce).
Logged totals all-reduce the local terms; the global gradient norm sums the sharded parameters'
squared norms across ranks and counts b_dec and W_skip once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import nn

from clt_forge.clt.deferred import DeferredDecoderGrad
from clt_forge.clt.loss import LossTerms, clt_loss
from clt_forge.clt.model import CLTOutput, CrossLayerTranscoder

__all__ = [
    "FeatureShardedCLT",
    "all_gather_last",
    "all_reduce_sum",
    "clip_global_norm",
    "deferred_sink",
    "feature_slice",
    "shard_clt",
]

SHARDED = ("W_enc", "b_enc", "log_threshold", "W_dec")
REPLICATED = ("b_dec", "W_skip")


def feature_slice(d_features: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous features: sizes differ by at most one."""
    base, extra = divmod(d_features, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class _AllReduceSum(torch.autograd.Function):
    """Forward: sum over ranks. Backward: identity (every rank holds the full upstream gradient)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    return _AllReduceSum.apply(tensor, group)


@torch.no_grad()
def all_gather_last(
    tensor: Float[torch.Tensor, "*lead n"], group: Any = None
) -> Float[torch.Tensor, "*lead n_all_ranks"]:
    """Every rank's `tensor` concatenated along the last dim, in rank order (sizes may differ)."""
    sizes = torch.tensor([tensor.shape[-1]], device=tensor.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(dist.get_world_size(group))]
    dist.all_gather(all_sizes, sizes, group=group)
    widest = int(max(s.item() for s in all_sizes))
    padded = torch.full((*tensor.shape[:-1], widest), -torch.inf, dtype=tensor.dtype, device=tensor.device)
    padded[..., : tensor.shape[-1]] = tensor
    parts = [torch.empty_like(padded) for _ in all_sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[..., : int(n.item())] for part, n in zip(parts, all_sizes, strict=True)], dim=-1)


@torch.no_grad()
def shard_clt(full: CrossLayerTranscoder, rank: int, world: int) -> CrossLayerTranscoder:
    """This rank's slice of a full CLT as a plain CrossLayerTranscoder (copies, same dtype/device)."""
    cols = feature_slice(full.d_features, rank, world)
    local = CrossLayerTranscoder(
        full.n_layers,
        full.d_model,
        cols.stop - cols.start,
        bandwidth=full.bandwidth,
        dtype=full.W_enc.dtype,
        device=full.W_enc.device,
        init=False,
        activation=full.activation_name,
        k=full.k,
        decode=full.decode_mode,
        skip=full.W_skip is not None,
        native_kernel=full.native_kernel,
    )
    local.W_enc.copy_(full.W_enc[:, :, cols])
    local.b_enc.copy_(full.b_enc[:, cols])
    local.log_threshold.copy_(full.log_threshold[:, cols])
    local.W_dec.copy_(full.W_dec[cols])
    local.b_dec.copy_(full.b_dec)
    if local.W_skip is not None and full.W_skip is not None:
        local.W_skip.copy_(full.W_skip)
    return local


class FeatureShardedCLT(nn.Module):
    """Wraps this rank's slice (`local`, a plain CrossLayerTranscoder) into the global CLT."""

    def __init__(self, local: CrossLayerTranscoder, group: Any = None) -> None:
        super().__init__()
        self.local = local
        self.group = group

    def forward(self, x: torch.Tensor) -> CLTOutput:
        """Local pre-activations / features / decoder norms; the global reconstruction."""
        h, activated = self.local.encode_activated(x, gather=lambda t: all_gather_last(t, self.group))
        z = activated.features
        partial, norms = self.local.decode_with_norms(z, bias=False, grad_needed=activated.grad_needed)
        reconstruction = all_reduce_sum(partial, self.group) + self.local.b_dec
        if self.local.W_skip is not None:
            reconstruction = reconstruction + self.local.skip(x)
        return CLTOutput(h, z, reconstruction, norms, l0_penalty=self.local.activation.l0_penalty)

    def loss(
        self, output: CLTOutput, target: torch.Tensor, l0_coefficient: float, c: float, dead_coefficient: float
    ) -> tuple[LossTerms, LossTerms]:
        """(what to backpropagate on this rank, the global terms for logging)."""
        local = clt_loss(
            output, target, output.decoder_norms, self.local.jumprelu_threshold(), l0_coefficient, c, dead_coefficient
        )
        totals = torch.stack([local.sparsity.detach(), local.dead.detach()])
        dist.all_reduce(totals, group=self.group)
        mse = local.mse.detach()
        logged = LossTerms(total=mse + totals.sum(), mse=mse, sparsity=totals[0], dead=totals[1])
        return local, logged

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global-norm clipping across ranks: sharded parameters summed over ranks, b_dec and W_skip once."""
        params = dict(self.local.named_parameters())
        sharded = [g for n in SHARDED if (g := params[n].grad) is not None]
        replicated = [g for n in REPLICATED if n in params and (g := params[n].grad) is not None]
        return clip_global_norm(
            sharded, replicated, max_norm, deferred_sink(self.local), lambda t: dist.all_reduce(t, group=self.group)
        )


@torch.no_grad()
def clip_global_norm(
    sharded: list[torch.Tensor],
    replicated: list[torch.Tensor],
    max_norm: float,
    sink: DeferredDecoderGrad | None = None,
    reduce: Callable[[torch.Tensor], Any] | None = None,
) -> torch.Tensor:
    """The global gradient norm (before clipping), in float64: the squares of the `sharded`
    gradients (and of W_dec's deferred one, `sink`) summed by `reduce` over ranks, the
    `replicated` ones counted once; every gradient (and `sink.scale`) times min(1, max_norm /
    (norm + 1e-6)) when max_norm > 0."""
    square = torch.zeros((), device=(sharded + replicated)[0].device, dtype=torch.float64)
    for grad in sharded:
        square += grad.double().square().sum()
    if sink is not None and sink.square is not None:
        square += sink.square
    if reduce is not None:
        reduce(square)
    for grad in replicated:
        square += grad.double().square().sum()
    norm = square.sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0).to(sharded[0].dtype)
        for grad in sharded + replicated:
            grad.mul_(scale)
        if sink is not None:
            sink.scale = scale
    return norm.float()


def deferred_sink(clt: CrossLayerTranscoder) -> DeferredDecoderGrad | None:
    """The CLT's `optim.decoder_grad=blocks` sink, if it has one."""
    return clt.decoder_grad if isinstance(clt.decoder_grad, DeferredDecoderGrad) else None
