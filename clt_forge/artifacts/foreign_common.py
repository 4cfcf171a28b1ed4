"""What a reader of another library's CLT checkpoint hands `load_checkpoint`: the shared shapes.

Each foreign format has its own module (foreign_circuit_tracer.py, foreign_reference.py) with
four functions: `detect(folder) -> bool` (from file names alone), `read_header(folder) ->
ForeignHeader` (config and tensor headers only: no weights are read), `read_weights(folder,
header, device) -> dict` (our checkpoint's tensor names and layout, see checkpoint.py: W_enc
[L, D, F], b_enc [L, F], log_threshold [L, F], W_dec [F, P, D] packed source-major, b_dec [L, D],
norm.in_scale [L], norm.out_scale [L], float32) and `read_features(folder, header, wanted) ->
dict` (only some features' encoders and decoder rows: feature_subset.py). checkpoint.py turns
the header into a CheckpointInfo and the tensors into a CrossLayerTranscoder, so every stage
takes the folder as it takes ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from clt_forge.errors import CLTError

__all__ = ["ForeignHeader", "block_hooks", "relu_log_threshold"]


@dataclass
class ForeignHeader:
    format: str  # e.g. "circuit-tracer/clt"
    n_layers: int
    d_model: int
    d_features: int
    bandwidth: float
    model: dict[str, Any]  # what the folder says about the language model ({"hf_name": ...} or {})
    hooks: dict[str, list[str]]  # {"mlp_in": [per layer], "mlp_out": [...]}: the declared hook points
    imported: dict[str, Any] = field(default_factory=dict)  # folder, activation, ... (CheckpointInfo.train)


def block_hooks(n_layers: int, feature_input_hook: str, feature_output_hook: str) -> dict[str, list[str]]:
    """circuit-tracer's convention: a block-relative hook name h is `blocks.{layer}.{h}`."""
    return {
        "mlp_in": [f"blocks.{layer}.{feature_input_hook}" for layer in range(n_layers)],
        "mlp_out": [f"blocks.{layer}.{feature_output_hook}" for layer in range(n_layers)],
    }


def relu_log_threshold(threshold: torch.Tensor, where: str) -> torch.Tensor:
    """log(theta) for our JumpReLU z = h * (h > exp(log_threshold)). theta = 0 (log = -inf) is
    exactly ReLU; a negative theta would let negative pre-activations through, which no
    exp(log_threshold) can express, so it is refused."""
    if bool((threshold < 0).any()):
        worst = float(threshold.min())
        raise CLTError(
            f"{where}: a JumpReLU threshold is negative ({worst:g}); clt-forge's JumpReLU keeps "
            "theta = exp(log_threshold) >= 0 and cannot represent it."
        )
    return threshold.float().log()
