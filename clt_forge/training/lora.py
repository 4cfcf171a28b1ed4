"""Low-rank finetuning of a pretrained CLT: rank-R adapters on W_enc and W_dec, base frozen.

Adapters are torch parametrizations, so the CLT module is unchanged and reads its weights as
usual: W_enc[l] = base[l] + A[l] @ B[l] (A [L, D, R], B [L, R, F]) and, W_dec viewed as a
[F, P * D] matrix, W_dec = base + U @ V (U [F, R], V [R, P * D]). B and V start at zero, so
finetuning starts exactly at the pretrained CLT. `merged_copy` bakes the adapters into plain
weights for the normal checkpoint format.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from clt_forge.clt.model import CrossLayerTranscoder


class EncoderDelta(nn.Module):
    def __init__(self, n_layers: int, d_model: int, d_features: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(n_layers, d_model, rank) / d_model**0.5)
        self.B = nn.Parameter(torch.zeros(n_layers, rank, d_features))

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base + torch.bmm(self.A, self.B)


class DecoderDelta(nn.Module):
    def __init__(self, d_features: int, n_pairs: int, d_model: int, rank: int):
        super().__init__()
        self.U = nn.Parameter(torch.randn(d_features, rank) / d_features**0.5)
        self.V = nn.Parameter(torch.zeros(rank, n_pairs * d_model))

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base + (self.U @ self.V).view_as(base)


def add_lora(clt: CrossLayerTranscoder, rank: int) -> CrossLayerTranscoder:
    """Freeze every base parameter and attach trainable rank-`rank` adapters (in place)."""
    for param in clt.parameters():
        param.requires_grad_(False)
    n_layers, d_model, d_features = clt.W_enc.shape
    parametrize.register_parametrization(clt, "W_enc", EncoderDelta(n_layers, d_model, d_features, rank))
    parametrize.register_parametrization(clt, "W_dec", DecoderDelta(d_features, clt.W_dec.shape[1], d_model, rank))
    return clt


def merged_copy(clt: CrossLayerTranscoder) -> CrossLayerTranscoder:
    """The CLT with adapters folded into plain weights (the module itself when it has none)."""
    if not parametrize.is_parametrized(clt):
        return clt
    merged = copy.deepcopy(clt)
    for name in ("W_enc", "W_dec"):
        if parametrize.is_parametrized(merged, name):
            parametrize.remove_parametrizations(merged, name, leave_parametrized=True)
    return merged
