"""Per-layer normalisation of MLP inputs and outputs (float32 factors, stored in checkpoints).

The CLT sees x / in_scale[l] and predicts y / out_scale[l], one scalar per layer and kind:
- `mean_norm` (the paper's): scale = E||v_l|| / sqrt(d_model), so the mean token norm is
  sqrt(d_model). A layer whose few massive tokens (e.g. values of ~25,000 at BOS-like
  positions) dominate its squared norm keeps them large, so the loss weighs that layer by how
  much of its variance they hold;
- `rms`: scale = sqrt(E||v_l||^2 / d_model), so the mean squared norm is d_model: every
  layer weighs the same in the loss, and massive tokens shrink the ordinary ones;
- `mixed`: inputs by their mean norm (the encoder sees ordinary tokens at norm ~sqrt(d_model)
  even where massive ones exist), outputs by RMS (every layer weighs the same in the loss).
Scalars per layer (no mean shift) fold exactly into the weights for export: W_enc' = W_enc /
in_scale, W_dec' = W_dec * out_scale[target], b_dec' = b_dec * out_scale. Factors come from
the dataset manifest (exact float64 sums over every cached token) or are estimated from the
first batches in float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from clt_forge.artifacts.activations import Manifest
from clt_forge.artifacts.reader import ActivationBatch
from clt_forge.errors import CLTError

PER_KIND = {"mean_norm": ("mean_norm", "mean_norm"), "rms": ("rms", "rms"), "mixed": ("mean_norm", "rms")}
METHODS = tuple(PER_KIND)  # the (inputs, outputs) scaling of each method


@dataclass
class Normalization:
    in_scale: torch.Tensor  # float32 [n_layers]
    out_scale: torch.Tensor  # float32 [n_layers]

    @classmethod
    def from_manifest(cls, manifest: Manifest, method: str) -> Normalization:
        """CLTError when the dataset's statistics lack what `method` needs (mean_norm: cached
        before mean token norms were kept)."""
        check_method(method)
        d = torch.tensor(float(manifest.d_model), dtype=torch.float64)
        scales = []
        for kind, kind_method in zip(("mlp_in", "mlp_out"), PER_KIND[method], strict=True):
            stats = manifest.stats[kind]
            if kind_method == "rms":
                scales.append((torch.tensor(stats["mean_sq_norm"], dtype=torch.float64) / d).sqrt().float())
            elif "mean_norm" in stats:
                scales.append((torch.tensor(stats["mean_norm"], dtype=torch.float64) / d.sqrt()).float())
            else:
                raise CLTError("the dataset's statistics have no mean token norm (cached by an older clt-forge)")
        return cls(*scales)

    @classmethod
    def estimate(cls, batches: Iterable[ActivationBatch], method: str) -> Normalization:
        check_method(method)
        squares: dict[str, torch.Tensor] = {}
        norms: dict[str, torch.Tensor] = {}
        tokens = 0
        d_model = 0
        for batch in batches:
            for kind, x in (("in", batch.mlp_in), ("out", batch.mlp_out)):
                token_squares = x.float().square().sum(-1)  # [batch, n_layers]
                for sums, total in ((squares, token_squares.sum(0)), (norms, token_squares.sqrt().sum(0))):
                    sums[kind] = sums[kind] + total if kind in sums else total
            tokens += batch.mlp_in.shape[0]
            d_model = batch.mlp_in.shape[-1]
        if not squares:
            raise ValueError("no batches to estimate the normalisation from")
        scales = [
            (squares[kind] / (tokens * d_model)).sqrt() if kind_method == "rms" else norms[kind] / tokens / d_model**0.5
            for kind, kind_method in zip(("in", "out"), PER_KIND[method], strict=True)
        ]
        return cls(*scales)

    def with_layer_weights(self, weights: Mapping[int, float], key: str = "layer_weights") -> Normalization:
        """out_scale[l] / sqrt(w_l): layer l's squared error weighs w_l in a loss on normalised
        outputs; inputs and the outputs in model units are unchanged."""
        out_scale = self.out_scale.clone()
        for layer, weight in weights.items():
            if not 0 <= int(layer) < out_scale.shape[0]:
                raise CLTError(f"{key}: layer {layer} is not one of the {out_scale.shape[0]} layers")
            if not weight > 0:
                raise CLTError(f"{key}: the weight of layer {layer} must be positive, got {weight}")
            out_scale[int(layer)] /= float(weight) ** 0.5
        return Normalization(self.in_scale, out_scale)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.in_scale.to(x.device)[:, None]

    def outputs(self, y: torch.Tensor) -> torch.Tensor:
        return y / self.out_scale.to(y.device)[:, None]

    def state(self) -> dict[str, torch.Tensor]:
        return {"norm.in_scale": self.in_scale, "norm.out_scale": self.out_scale}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> Normalization:
        return cls(tensors["norm.in_scale"].float(), tensors["norm.out_scale"].float())


def check_method(method: str) -> None:
    if method not in METHODS:
        raise CLTError(f"normalization={method!r} is not one of {', '.join(METHODS)}")
