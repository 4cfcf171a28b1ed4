"""Normalisation statistics of MLP inputs and outputs, accumulated per chunk (float64 across chunks).

Kept per channel so any normalisation can be derived later: count, sum and sum of squares per
(layer, channel) for each kind, and per layer the sum of token norms ||x|| (the paper's mean
token norm; datasets cached before it was kept have none); merged across shards by addition.
Written as float32 means to stats.safetensors, with per-layer scalars (std, mean squared norm,
mean norm, max |x|) in the manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load, save

KINDS = ("mlp_in", "mlp_out")


@dataclass
class RunningStats:
    n_layers: int
    d_model: int
    count: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    squares: dict[str, torch.Tensor] = field(default_factory=dict)
    max_abs: dict[str, torch.Tensor] = field(default_factory=dict)
    norms: dict[str, torch.Tensor] | None = field(default_factory=dict)  # None: not kept (older shards)

    def __post_init__(self) -> None:
        shape = (self.n_layers, self.d_model)
        for kind in KINDS:
            self.sums.setdefault(kind, torch.zeros(shape, dtype=torch.float64))
            self.squares.setdefault(kind, torch.zeros(shape, dtype=torch.float64))
            self.max_abs.setdefault(kind, torch.zeros(self.n_layers, dtype=torch.float64))
            if self.norms is not None:
                self.norms.setdefault(kind, torch.zeros(self.n_layers, dtype=torch.float64))

    def observer(self, kind: str) -> Callable[[int, torch.Tensor], None]:
        """observe(layer, values [tokens, d_model]) adds one layer of a chunk (count: `count +=`
        once per chunk). The chunk encoder calls it while each layer is in cache, so the
        statistics cost no pass of their own over the activations."""
        sums, squares, max_abs = self.sums[kind], self.squares[kind], self.max_abs[kind]
        norms = self.norms[kind] if self.norms is not None else None

        def observe(layer: int, values: torch.Tensor) -> None:
            # float32 sums over one chunk's tokens (blocked summation, ~1e-7 relative error),
            # accumulated across chunks in float64: 10x cheaper than converting to float64
            sums[layer] += values.sum(0)
            squares[layer] += torch.linalg.vecdot(values, values, dim=0)
            if norms is not None:
                norms[layer] += float(torch.linalg.vector_norm(values, dim=1).sum())
            max_abs[layer] = max(float(max_abs[layer]), float(values.amax()), -float(values.amin()))

        return observe

    def merge(self, other: RunningStats) -> None:
        self.count += other.count
        for kind in KINDS:
            self.sums[kind] += other.sums[kind]
            self.squares[kind] += other.squares[kind]
            torch.maximum(self.max_abs[kind], other.max_abs[kind], out=self.max_abs[kind])
        if self.norms is not None and other.norms is not None:
            for kind in KINDS:
                self.norms[kind] += other.norms[kind]
        else:
            self.norms = None  # a shard without them: the sum would be wrong

    def to_bytes(self) -> bytes:
        tensors = {"count": torch.tensor([self.count], dtype=torch.float64)}
        for kind in KINDS:
            tensors[f"{kind}.sum"] = self.sums[kind]
            tensors[f"{kind}.sum_sq"] = self.squares[kind]
            tensors[f"{kind}.max_abs"] = self.max_abs[kind]
            if self.norms is not None:
                tensors[f"{kind}.sum_norm"] = self.norms[kind]
        return save(tensors)

    @classmethod
    def from_bytes(cls, data: bytes) -> RunningStats:
        tensors = load(data)
        n_layers, d_model = tensors["mlp_in.sum"].shape
        return cls(
            n_layers,
            d_model,
            count=int(tensors["count"][0]),
            sums={k: tensors[f"{k}.sum"] for k in KINDS},
            squares={k: tensors[f"{k}.sum_sq"] for k in KINDS},
            max_abs={k: tensors[f"{k}.max_abs"] for k in KINDS},
            norms={k: tensors[f"{k}.sum_norm"] for k in KINDS} if "mlp_in.sum_norm" in tensors else None,
        )

    def means(self) -> dict[str, torch.Tensor]:
        """float32 tensors for stats.safetensors: per-channel mean and mean square per kind."""
        count = max(self.count, 1)
        out = {}
        for kind in KINDS:
            out[f"{kind}.mean"] = (self.sums[kind] / count).float()
            out[f"{kind}.mean_sq"] = (self.squares[kind] / count).float()
        return out

    def summary(self) -> dict[str, dict[str, list[float]]]:
        """Per-layer scalars for the manifest (float32 precision)."""
        count = max(self.count, 1)
        out = {}
        for kind in KINDS:
            mean = self.sums[kind] / count
            variance = (self.squares[kind] / count - mean.square()).clamp_min(0)
            out[kind] = {
                "std": variance.mean(1).sqrt().float().tolist(),  # per-layer, pooled over channels
                "mean_sq_norm": (self.squares[kind].sum(1) / count).float().tolist(),  # E ||x||^2
                "max_abs": self.max_abs[kind].float().tolist(),
            }
            if self.norms is not None:
                out[kind]["mean_norm"] = (self.norms[kind] / count).float().tolist()  # E ||x||
        return out


def load_stats(path: Path) -> dict[str, torch.Tensor]:
    return load(path.read_bytes())
