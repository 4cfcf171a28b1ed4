"""JumpReLU / step: exact forward, pass-through h-gradient, and rectangle-kernel theta-gradient.

The theta-gradients are checked against finite differences of the kernel-smoothed functions
E_u[f(h + eps u, theta)], u ~ U(-1/2, 1/2), whose closed forms live next to the Functions.
"""

from __future__ import annotations

import pytest
import torch

from clt_forge.clt.jumprelu import jumprelu, rectangle, smoothed_jumprelu, smoothed_step, step

torch.set_num_threads(2)


def _away_from_kinks(h: torch.Tensor, theta: torch.Tensor, eps: float, margin: float = 1e-3) -> torch.Tensor:
    """Shift h so that |h - theta| is never within `margin` of 0 or eps/2 (where the smoothed
    functions have kinks and finite differences are not defined)."""
    d = h - theta
    for kink in (0.0, eps / 2, -eps / 2):
        close = (d - kink).abs() < margin
        d = torch.where(close, d + 4 * margin, d)
    return theta + d


def _inputs(eps: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """h [batch=7, n_layers=3, d_features=5] around theta [3, 5], float64."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.rand(3, 5, generator=gen, dtype=torch.float64) * 0.5 + 0.05
    h = theta + (torch.rand(7, 3, 5, generator=gen, dtype=torch.float64) - 0.5) * 3 * eps
    return _away_from_kinks(h, theta, eps), theta


def test_forward_values() -> None:
    h = torch.tensor([-1.0, 0.0, 0.02, 0.03, 0.031, 0.5, 2.0])
    theta = torch.tensor(0.03)
    torch.testing.assert_close(jumprelu(h, theta), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.031, 0.5, 2.0]))
    torch.testing.assert_close(step(h, theta), torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]))
    h3, theta2 = _inputs(1.0)
    torch.testing.assert_close(jumprelu(h3, theta2), torch.where(h3 > theta2, h3, torch.zeros_like(h3)))


def test_rectangle() -> None:
    u = torch.tensor([-0.6, -0.5, -0.49, 0.0, 0.49, 0.5, 0.6])
    torch.testing.assert_close(rectangle(u), torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
def test_h_gradient_is_the_mask(eps: float) -> None:
    h, theta = _inputs(eps)
    h.requires_grad_()
    grad_out = torch.randn_like(h)
    jumprelu(h, theta, eps).backward(grad_out)
    torch.testing.assert_close(h.grad, grad_out * (h > theta).to(h.dtype))
    # Away from the jump, the true derivative in h is the mask too: gradcheck applies exactly.
    assert torch.autograd.gradcheck(lambda h_: jumprelu(h_, theta, eps), (h.detach().clone().requires_grad_(),))
    # The step's STE passes nothing to h (Rajamanoharan et al. 2024).
    h.grad = None
    step(h, theta, eps).backward(grad_out)
    torch.testing.assert_close(h.grad, torch.zeros_like(h))


def _ste_on_smoothed(fn, smoothed, h: torch.Tensor, eps: float):
    """A function whose value is the smoothed function and whose theta-gradient is the STE's."""

    def f(theta: torch.Tensor) -> torch.Tensor:
        ste = fn(h, theta, eps)
        return smoothed(h, theta.detach(), eps) + (ste - ste.detach())

    return f


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(("fn", "smoothed"), [(jumprelu, smoothed_jumprelu), (step, smoothed_step)])
def test_theta_gradient_matches_smoothed_finite_difference(fn, smoothed, eps: float) -> None:
    h, theta = _inputs(eps, seed=1)
    # gradcheck: analytical (STE backward, summed over the broadcast batch) vs numerical
    # (central differences of the smoothed closed form), per theta entry.
    assert torch.autograd.gradcheck(_ste_on_smoothed(fn, smoothed, h, eps), (theta.clone().requires_grad_(),))


@pytest.mark.parametrize(("fn", "smoothed"), [(jumprelu, smoothed_jumprelu), (step, smoothed_step)])
def test_theta_gradient_through_log_threshold(fn, smoothed) -> None:
    """theta = exp(log_threshold), as the CLT stores it: the chain rule composes with the STE."""
    eps = 1.0
    h, theta = _inputs(eps, seed=2)
    weights = torch.randn_like(h)
    log_threshold = theta.log().clone().requires_grad_()
    (weights * fn(h, log_threshold.exp(), eps)).sum().backward()
    delta = 1e-6
    numerical = torch.empty_like(theta)
    for i in range(theta.numel()):
        bump = torch.zeros_like(theta).view(-1)
        bump[i] = delta
        bump = bump.view_as(theta)
        up = (weights * smoothed(h, (theta.log() + bump).exp(), eps)).sum()
        down = (weights * smoothed(h, (theta.log() - bump).exp(), eps)).sum()
        numerical.view(-1)[i] = (up - down) / (2 * delta)
    torch.testing.assert_close(log_threshold.grad, numerical, rtol=1e-6, atol=1e-8)


def test_smoothed_forms_match_monte_carlo() -> None:
    """The closed forms really are the expectations under h + eps U(-1/2, 1/2)."""
    eps = 1.0
    gen = torch.Generator().manual_seed(3)
    h = torch.linspace(-1.0, 1.5, 11, dtype=torch.float64)
    theta = torch.tensor(0.3, dtype=torch.float64)
    noise = (torch.rand(200_000, 1, generator=gen, dtype=torch.float64) - 0.5) * eps
    noisy = h + noise
    torch.testing.assert_close((noisy * (noisy > theta)).mean(0), smoothed_jumprelu(h, theta, eps), atol=5e-3, rtol=0)
    torch.testing.assert_close((noisy > theta).to(h.dtype).mean(0), smoothed_step(h, theta, eps), atol=5e-3, rtol=0)


def test_gradient_reaches_both_inputs_in_float32() -> None:
    h = torch.randn(4, 2, 3, requires_grad=True)
    log_threshold = torch.full((2, 3), -3.0, requires_grad=True)
    jumprelu(h, log_threshold.exp(), 1.0).sum().backward()
    assert h.grad is not None and log_threshold.grad is not None
    assert log_threshold.grad.shape == (2, 3)
