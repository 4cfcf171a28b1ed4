"""JumpReLU and Heaviside step with the straight-through estimators of Rajamanoharan et al. (2024).

The one job of this file: the two autograd Functions a CLT's activation and its L0-style terms
are built from, with a learned per-feature threshold theta (the CLT stores log theta so theta
stays positive; callers pass theta = exp(log_threshold)).

    jumprelu(h, theta) = h * H(h - theta)        step(h, theta) = H(h - theta)

Forward passes are exact. Backward passes use the rectangle kernel of bandwidth eps
(rect(u) = 1 where -1/2 < u < 1/2, else 0):

    jumprelu:  d/dh     = H(h - theta)                          (pass-through where active)
               d/dtheta = -(theta / eps) * rect((h - theta) / eps)
    step:      d/dh     = 0                                      (as in the paper)
               d/dtheta = -(1 / eps) * rect((h - theta) / eps)

The theta gradients are the exact theta-derivatives of the kernel-smoothed functions
E_u[f(h + eps * u, theta)], u ~ U(-1/2, 1/2) (see `smoothed_jumprelu` / `smoothed_step`, used
by the tests). `theta` may have any shape that broadcasts against `h` (for the CLT: h is
[batch, n_layers, d_features] and theta [n_layers, d_features]); its gradient is summed back
to theta's own shape.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float

__all__ = ["jumprelu", "rectangle", "smoothed_jumprelu", "smoothed_step", "step"]


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """rect(u) = 1 on the open interval (-1/2, 1/2), else 0, in u's dtype."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to the shape of the tensor that was broadcast."""
    return grad.sum_to_size(shape) if grad.shape != shape else grad


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(h, theta)
        ctx.bandwidth = bandwidth
        return h * (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        h, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_h = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_h = grad_out * (h > theta).to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            grad_theta = _sum_to(-(theta / eps) * rectangle((h - theta) / eps) * grad_out, theta.shape)
        return grad_h, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(h, theta)
        ctx.bandwidth = bandwidth
        return (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        h, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            grad_theta = _sum_to(-(1.0 / eps) * rectangle((h - theta) / eps) * grad_out, theta.shape)
        return grad_h, grad_theta, None


def jumprelu(
    h: Float[torch.Tensor, "*batch"], theta: torch.Tensor, bandwidth: float = 1.0
) -> Float[torch.Tensor, "*batch"]:
    """z = h * H(h - theta) with the STE above; `bandwidth` is the kernel width eps."""
    return _JumpReLU.apply(h, theta, bandwidth)


def step(
    h: Float[torch.Tensor, "*batch"], theta: torch.Tensor, bandwidth: float = 1.0
) -> Float[torch.Tensor, "*batch"]:
    """H(h - theta) (1 where h > theta) with the STE above; differentiable in theta only."""
    return _Step.apply(h, theta, bandwidth)


def smoothed_jumprelu(h: torch.Tensor, theta: torch.Tensor, bandwidth: float = 1.0) -> torch.Tensor:
    """E_u[(h + eps u) H(h + eps u - theta)], u ~ U(-1/2, 1/2), in closed form (for tests).

    With a = max(theta, h - eps/2) and b = h + eps/2 it is (b^2 - a^2) / (2 eps) where a < b, else
    0; its theta-derivative is exactly the STE's -(theta / eps) rect((h - theta) / eps).
    """
    eps = bandwidth
    lo = torch.maximum(theta, h - eps / 2)
    hi = h + eps / 2
    return torch.where(lo < hi, (hi * hi - lo * lo) / (2 * eps), torch.zeros_like(hi))


def smoothed_step(h: torch.Tensor, theta: torch.Tensor, bandwidth: float = 1.0) -> torch.Tensor:
    """E_u[H(h + eps u - theta)], u ~ U(-1/2, 1/2) = clamp((h - theta) / eps + 1/2, 0, 1) (for tests)."""
    return ((h - theta) / bandwidth + 0.5).clamp(0.0, 1.0)
