"""Per-layer normalisation of MLP inputs and outputs (float32 factors, stored in checkpoints).

The CLT sees x / in_scale[l] and predicts y / out_scale[l], with scale = sqrt(E||v_l||^2 / d_model)
so every layer's vectors have mean squared norm d_model. Scalars per layer (no mean shift) fold
exactly into the weights for export: W_enc' = W_enc / in_scale, W_dec' = W_dec * out_scale[target],
b_dec' = b_dec * out_scale. Factors come from the dataset manifest (exact float64 sums over
every cached token) or are estimated from the first batches in float32.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from clt_forge.artifacts.activations import Manifest
from clt_forge.artifacts.reader import ActivationBatch


@dataclass
class Normalization:
    in_scale: torch.Tensor  # float32 [n_layers]
    out_scale: torch.Tensor  # float32 [n_layers]

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> Normalization:
        d_model = manifest.d_model
        scales = [
            (torch.tensor(manifest.stats[kind]["mean_sq_norm"], dtype=torch.float64) / d_model).sqrt().float()
            for kind in ("mlp_in", "mlp_out")
        ]
        return cls(*scales)

    @classmethod
    def estimate(cls, batches: Iterable[ActivationBatch]) -> Normalization:
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for batch in batches:
            for kind, x in (("in", batch.mlp_in), ("out", batch.mlp_out)):
                total = x.float().square().sum(dim=(0, 2))
                sums[kind] = sums[kind] + total if kind in sums else total
            count += batch.mlp_in.shape[0] * batch.mlp_in.shape[-1]
        if not sums:
            raise ValueError("no batches to estimate the normalisation from")
        return cls((sums["in"] / count).sqrt(), (sums["out"] / count).sqrt())

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.in_scale.to(x.device)[:, None]

    def outputs(self, y: torch.Tensor) -> torch.Tensor:
        return y / self.out_scale.to(y.device)[:, None]

    def state(self) -> dict[str, torch.Tensor]:
        return {"norm.in_scale": self.in_scale, "norm.out_scale": self.out_scale}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> Normalization:
        return cls(tensors["norm.in_scale"].float(), tensors["norm.out_scale"].float())
