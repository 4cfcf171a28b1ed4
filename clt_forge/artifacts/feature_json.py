"""Feature files in circuit-tracer's feature JSON schema (what its viewer and Neuronpedia read).

One file per feature, named `{cantor(layer, feature)}.json`: the id circuit-tracer's graph
JSON gives a CLT feature node (`feature` = Cantor pairing of layer and index), which is how
its frontend finds the file under the graph's `scan` folder. Fields: index, transcoder_id,
examples_quantiles (top activations first, then bands of the uniform sample of activating
contexts, highest band first: `quantiles` bands), top_logits, bottom_logits, act_min, act_max,
quantile_values, histogram (counts on `histogram_bins` equal bins over [0, act_max],
re-binned from the database's fine log-spaced bins), activation_frequency; plus explanation
and detection_score.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from clt_forge.artifacts.features import FeatureStore

__all__ = ["cantor", "export_feature_files", "feature_json"]


def cantor(layer: int, feature: int) -> int:
    """circuit-tracer's feature node id: the Cantor pairing of (layer, feature)."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


DEFAULT_DISPLAY = {"histogram_bins": 32, "quantiles": 4}  # databases written before meta.display


def feature_json(
    store: FeatureStore, layer: int, feature: int, bins: int | None = None, bands: int | None = None
) -> dict[str, Any]:
    """One feature's JSON; `bins` / `bands` default to the database's meta.display, i.e. the
    `autointerp.histogram_bins` / `autointerp.quantiles` it was collected with."""
    record = store.feature(layer, feature)
    if record is None:
        raise KeyError((layer, feature))
    meta = store.meta()
    display = {**DEFAULT_DISPLAY, **meta.get("display", {})}
    bins = bins or int(display["histogram_bins"])
    bands = bands or int(display["quantiles"])
    top = store.examples(layer, feature, "top")
    sample = sorted(store.examples(layer, feature, "sample"), key=lambda e: -e["value"])
    quantiles = [{"quantile_name": "Top activations", "examples": [_example(e) for e in top]}]
    per_band = max(1, -(-len(sample) // bands)) if sample else 0
    for band in range(bands):
        members = sample[band * per_band : (band + 1) * per_band]
        if members:
            quantiles.append(
                {"quantile_name": f"Subsample interval {band}", "examples": [_example(e) for e in members]}
            )
    act_max = float(record["max_act"])
    edges = meta.get("hist_edges", [])
    return {
        "index": cantor(layer, feature),
        "transcoder_id": f"layer {layer} feature {feature}",
        "layer": layer,
        "feature": feature,
        "examples_quantiles": quantiles,
        "top_logits": record["top_logits"],
        "bottom_logits": record["bottom_logits"],
        "act_min": 0.0,
        "act_max": act_max,
        "quantile_values": [e["value"] for e in sample],
        "histogram": rebin(record["histogram"], edges, act_max, bins),
        "activation_frequency": float(record["frequency"]),
        "explanation": record["explanation"],
        "detection_score": record["score"],
    }


def rebin(counts: list[int], edges: list[float], act_max: float, bins: int) -> list[int]:
    """Fine counts (bin i covers edges[i-1]..edges[i]; 0 below edges[0], last above edges[-1])
    -> `bins` equal bins over [0, act_max], each fine bin assigned by its geometric centre."""
    out = [0] * bins
    if act_max <= 0:
        return out
    for i, count in enumerate(counts):
        if not count:
            continue
        if i == 0:
            centre = edges[0] / 2
        elif i >= len(edges):
            centre = act_max
        else:
            centre = (edges[i - 1] * edges[i]) ** 0.5
        out[min(bins - 1, int(min(centre, act_max) / act_max * bins))] += count
    return out


def export_feature_files(store: FeatureStore, folder: Path) -> int:
    """Write every feature that fired; returns how many files were written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for layer, feature in store.features():
        record = store.feature(layer, feature)
        if record is None or record["n_active"] == 0:
            continue
        path = folder / f"{cantor(layer, feature)}.json"
        scratch = path.with_suffix(".json.tmp")
        scratch.write_text(json.dumps(feature_json(store, layer, feature)))
        os.replace(scratch, path)
        written += 1
    return written


def _example(e: dict[str, Any]) -> dict[str, Any]:
    return {
        "tokens": e["tokens"],
        "tokens_acts_list": e["acts"],
        "train_token_ind": e["center"],
        "is_repeated_datapoint": False,
    }
