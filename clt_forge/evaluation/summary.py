"""The quality figures `clt demo` reports for its CLT (the same measures as benchmarks/quality.py).

    summary = quality_summary(checkpoint, held_out, data, graphs=[graph_json])
    print(format_summary(summary))

held_out: EV / L0 on the dataset's held-out tokens (mean, worst layer); replacement: the
replacement model's KL and top-1 agreement on `windows` held-out windows (every MLP replaced);
graphs: the replacement / completeness scores recorded in the given graph JSON files.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch

from clt_forge.artifacts.activations import block_relative
from clt_forge.artifacts.checkpoint import load_checkpoint
from clt_forge.config.schema import DataConfig
from clt_forge.data.windows import token_windows
from clt_forge.evaluation.held_out import held_out_metrics
from clt_forge.evaluation.replacement import replacement_scores
from clt_forge.models.loading import load_model, recorded_model_config

__all__ = ["format_summary", "quality_summary"]


def quality_summary(
    checkpoint: Path, held_out: Path, data: DataConfig, graphs: list[Path], windows: int = 16
) -> dict[str, Any]:
    clt, normalization, info = load_checkpoint(checkpoint)
    hooks = block_relative(info.hooks)
    metrics = held_out_metrics(clt, normalization, held_out, hooks=hooks)
    summary: dict[str, Any] = {
        "held_out": {key: metrics[key] for key in ("ev_mean", "ev_median", "ev_worst", "worst_layer", "l0_mean")},
    }
    summary["held_out"]["dead_fraction"] = metrics["dead_fraction"]
    if windows > 0:
        model = load_model(recorded_model_config(info.model))
        rows = list(itertools.islice(token_windows(data, model.tokenizer, split="held_out"), windows))
        scores = replacement_scores(model, clt, normalization, torch.stack(rows), per_layer=False, hooks=hooks)
        summary["replacement"] = {"kl": scores.kl, "top1": scores.top1, "positions": scores.positions}
    summary["graphs"] = {}
    for graph in graphs:
        metadata = json.loads(graph.read_text())["metadata"]
        summary["graphs"][graph.stem] = {
            "replacement": metadata["replacement_score"],
            "completeness": metadata["completeness_score"],
        }
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    held = summary["held_out"]
    lines = [
        f"held-out EV {held['ev_mean']:.3f} (worst layer {held['worst_layer']}: {held['ev_worst']:.3f}) "
        f"at {held['l0_mean']:.1f} active features per layer; never active: {held['dead_fraction']:.1%}"
    ]
    if "replacement" in summary:
        rep = summary["replacement"]
        lines.append(
            f"replacement model (every MLP replaced): KL {rep['kl']:.3f} nats, top-1 agreement {rep['top1']:.1%}"
        )
    for name, scores in summary["graphs"].items():
        lines.append(
            f"graph {name}: replacement {scores['replacement']:.3f}, completeness {scores['completeness']:.3f}"
        )
    return "\n".join(lines)
