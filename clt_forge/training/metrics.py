"""Training metrics: held-out explained variance / NMSE / L0 per layer, dead features, and
the metrics log (metrics.jsonl always; wandb when `logger=wandb`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.config.schema import LoggerConfig, LoggerKind


@torch.no_grad()
def evaluate(
    clt: CrossLayerTranscoder | torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1024,
    reduce_l0: Callable[[torch.Tensor], torch.Tensor] | None = None,
    fired: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Per-layer metrics on held-out (normalised) activations x, y: [tokens, n_layers, d_model].

    explained_variance[l] = 1 - SSE / sum ||y - mean(y)||^2 and nmse[l] = SSE / sum ||y||^2,
    both over the held-out tokens; l0[l] = mean active features per token. `clt` is anything
    whose forward gives a CLTOutput with the full reconstruction (a feature-sharded CLT holds
    only its features: `reduce_l0` sums its per-layer counts over the ranks).
    """
    n_layers = y.shape[1]
    sse = torch.zeros(n_layers, dtype=torch.float64)
    l0 = torch.zeros(n_layers, dtype=torch.float64)
    for start in range(0, x.shape[0], batch_size):
        out = clt(x[start : start + batch_size])
        target = y[start : start + batch_size]
        sse += (out.reconstruction - target).double().square().sum(dim=(0, 2)).cpu()
        l0 += (out.features != 0).double().sum(dim=(0, 2)).cpu()
        if fired is not None:  # [n_layers, d_features]: marks the features active on these tokens
            fired |= (out.features != 0).any(0)
    if reduce_l0 is not None:
        l0 = reduce_l0(l0)
    y64 = y.double()
    total = y64.square().sum(dim=(0, 2)).cpu()
    centered = (y64 - y64.mean(0)).square().sum(dim=(0, 2)).cpu()
    ev = 1 - sse / centered.clamp_min(1e-30)
    nmse = sse / total.clamp_min(1e-30)
    l0 = l0 / x.shape[0]
    return {
        "explained_variance": ev.tolist(),
        "nmse": nmse.tolist(),
        "l0": l0.tolist(),
        "ev_mean": float(ev.mean()),
        "ev_median": float(ev.median()),
        "nmse_total": float(sse.sum() / total.sum().clamp_min(1e-30)),
        "l0_mean": float(l0.mean()),
    }


class DeadFeatures:
    """A feature is dead when it has not fired on any of the last `window` training tokens."""

    def __init__(self, n_layers: int, d_features: int, window: int):
        self.window = window
        self.tokens = 0
        self.last_fired = torch.zeros(n_layers, d_features, dtype=torch.int64)

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> None:
        self.update_fired((features != 0).any(0), features.shape[0])

    @torch.no_grad()
    def update_fired(self, fired: torch.Tensor, tokens: int) -> None:
        """`fired` [n_layers, d_features]: which features were active on the step's `tokens` tokens."""
        self.tokens += tokens
        self.last_fired[fired.cpu()] = self.tokens

    def per_layer(self) -> list[int]:
        if self.tokens < self.window:
            return [0] * self.last_fired.shape[0]
        return ((self.tokens - self.last_fired) >= self.window).sum(1).tolist()

    def state(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "last_fired": self.last_fired.clone()}

    def load(self, state: dict[str, Any]) -> None:
        self.tokens, self.last_fired = state["tokens"], state["last_fired"].clone()


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl, and mirrors to wandb if asked."""

    def __init__(self, path: Path, logger: LoggerConfig, run_config: dict[str, Any]):
        self.path = path
        self.wandb: Any = None
        if logger.kind is LoggerKind.wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", logger.mode)
            self.wandb = wandb.init(project=logger.project, dir=str(path.parent), config=run_config, resume="allow")

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines past the checkpoint's step (they are recomputed identically)."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            flat = {f"{record['kind']}/{k}": v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
            self.wandb.log(flat, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
