"""Held-out reconstruction of a CLT on a cached dataset: EV, NMSE and L0 per layer, dead features.

    metrics = held_out_metrics(clt, normalization, "runs/demo/activations/held_out")

Every token of the dataset (or the first `max_tokens`) in the dataset's order, through
`training.metrics.evaluate` (the evaluator training logs with), plus the summary a reader
compares recipes by: mean / median / worst layer EV and the share of features that never fire
on these tokens (`dead_fraction`; with a few thousand tokens, rare features count as dead too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clt_forge.artifacts.activations import check_dataset_hooks, read_manifest
from clt_forge.artifacts.normalization import Normalization
from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.data.store import ActivationsStore
from clt_forge.training.metrics import evaluate

__all__ = ["held_out_metrics"]


@torch.no_grad()
def held_out_metrics(
    clt: CrossLayerTranscoder,
    normalization: Normalization,
    folder: str | Path,
    max_tokens: int | None = None,
    batch_size: int = 512,
    hooks: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """`hooks`: the CLT's (block-relative input, output) hooks; a dataset cached at others is refused."""
    manifest = read_manifest(Path(folder))
    if hooks is not None:
        check_dataset_hooks(manifest, Path(folder), hooks, "being evaluated", manifest.model)
    tokens = min(manifest.n_tokens, max_tokens or manifest.n_tokens)
    batch = next(iter(ActivationsStore.from_cache(folder, tokens, seed=0, shuffle_chunks=1)))
    device = clt.W_enc.device
    x = normalization.inputs(batch.mlp_in.to(device).float())
    y = normalization.outputs(batch.mlp_out.to(device).float())
    was_training = clt.training
    clt.eval()
    try:
        fired = torch.zeros(clt.n_layers, clt.d_features, dtype=torch.bool, device=device)
        metrics = evaluate(clt, x, y, batch_size=batch_size, fired=fired)
    finally:
        clt.train(was_training)
    ev = metrics["explained_variance"]
    worst = min(range(len(ev)), key=ev.__getitem__)
    return {
        **metrics,
        "ev_worst": ev[worst],
        "worst_layer": worst,
        "l0_median": float(torch.tensor(metrics["l0"]).median()),
        "dead_fraction": float((~fired).double().mean()),
        "tokens": tokens,
        "dataset": str(folder),
    }
