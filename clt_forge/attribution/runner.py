"""`AttributionRunner`: a trained CLT checkpoint -> attribution graphs (the paper's section 3.5 API).

    runner = AttributionRunner(clt_path="runs/demo/clt/final")
    result = runner.run('The opposite of "large" is "')
    runner.save(result, "runs/demo/graphs")          # <slug>.json + <slug>.pt

The language model is the one the checkpoint was trained on (its config is stored in the
checkpoint); `model_name=` may name it explicitly and is checked against the checkpoint.
Prompts are tokenized the way training windows were: the tokenizer's BOS, then the text
without special tokens. Token ids (never the string) go to circuit-tracer, whose 0.5.0
`ensure_tokenized` would otherwise replace a BOS whose id is 0 by another special token.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from circuit_tracer import attribute
from circuit_tracer.graph import Graph, compute_graph_scores

from clt_forge.artifacts.checkpoint import check_model_matches, read_info
from clt_forge.artifacts.graph import graph_json
from clt_forge.attribution.budget import Rates, model_rates, plan_attribution
from clt_forge.attribution.convert import to_circuit_tracer
from clt_forge.attribution.interventions import FeatureEdit, InterventionResult, intervene
from clt_forge.attribution.replacement import replacement_model
from clt_forge.config.schema import AttributionSettings  # the settings `clt attribute` composes too
from clt_forge.errors import CLTError
from clt_forge.models.loading import load_model, model_config, recorded_model_config

__all__ = ["AttributionResult", "AttributionRunner", "AttributionSettings", "slugify"]


@dataclass
class AttributionResult:
    prompt: str
    tokens: list[int]
    graph: Graph
    replacement_score: float
    completeness_score: float
    json: dict[str, Any] = field(repr=False)


def slugify(prompt: str, limit: int = 48) -> str:
    """A file-name-safe slug: lower-case words joined by '-'."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    slug = "-".join(words)[:limit].strip("-")
    return slug or "graph"


class AttributionRunner:
    def __init__(
        self,
        clt_path: str | Path,
        model_name: str | None = None,
        *,
        device: str | None = None,
        labels: Mapping[tuple[int, int], str] | None = None,
        features_path: str | Path | None = None,
        settings: AttributionSettings | None = None,
    ) -> None:
        self.clt_path = Path(clt_path)
        info = read_info(self.clt_path)
        if model_name is None:
            model_cfg = recorded_model_config(info.model)
        else:
            model_cfg = model_config(model_name)
            check_model_matches(info, self.clt_path, model_cfg)
        if device is not None:
            model_cfg.device = device
        self.model_cfg = model_cfg
        self.settings = settings or AttributionSettings()
        self.features_path = Path(features_path) if features_path else None
        self.labels = dict(labels or {})
        model = load_model(model_cfg)
        transcoder = to_circuit_tracer(self.clt_path, device=model_cfg.device, dtype=model.cfg.dtype)
        self.model = replacement_model(model, transcoder)
        self._rates: Rates | None = None  # the device's speed, measured at the first run

    def rates(self) -> Rates:
        """The device's measured rates for the attribution budget: measured once per runner (~0.4 s),
        not once per prompt."""
        if self._rates is None:
            self._rates = model_rates(self.model)
        return self._rates

    # ---- tokens ----------------------------------------------------------------------------

    def tokens(self, prompt: str) -> list[int]:
        """BOS + the prompt's tokens without special tokens (as in `clt cache` windows)."""
        tokenizer = self.model.tokenizer
        assert tokenizer is not None
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        if tokenizer.bos_token_id is None:
            raise CLTError(f"the tokenizer of {self.model_cfg.name} has no BOS token; attribution needs one.")
        if not ids:
            raise CLTError("the prompt is empty: nothing to attribute.")
        return [int(tokenizer.bos_token_id), *ids]

    # ---- attribution -----------------------------------------------------------------------

    def run(self, prompt: str, slug: str | None = None) -> AttributionResult:
        s = self.settings
        ids = self.tokens(prompt)
        cost = plan_attribution(self.model, ids, s, self.rates())
        graph = attribute(
            torch.tensor(ids),
            self.model,
            max_n_logits=s.max_n_logits,
            desired_logit_prob=s.desired_logit_prob,
            batch_size=cost.batch_size,
            max_feature_nodes=cost.max_feature_nodes,
            offload=s.offload,  # type: ignore[arg-type]
            verbose=s.verbose,
        )
        if graph.input_tokens.tolist() != ids:
            raise CLTError(f"circuit-tracer changed the prompt's tokens: {ids} -> {graph.input_tokens.tolist()}.")
        replacement, completeness = compute_graph_scores(graph)
        metadata = {
            "replacement_score": replacement,
            "completeness_score": completeness,
            "generation_settings": {
                "max_n_logits": s.max_n_logits,
                "desired_logit_prob": s.desired_logit_prob,
                "batch_size": cost.batch_size,
                "max_feature_nodes": cost.max_feature_nodes,
                "estimate": {"peak_gib": round(cost.peak_bytes / 2**30, 3), "minutes": round(cost.seconds / 60, 2)},
            },
            "info": {"generator": {"name": "clt-forge", "version": _version()}},
            "model": self.model_cfg.name,
            "checkpoint": str(self.clt_path.resolve()),
            "features": str(self.features_path.resolve()) if self.features_path else None,
            "prompt_token_ids": ids,
        }
        document = graph_json(
            graph,
            self.model.tokenizer,
            slug=slug or slugify(prompt),
            node_threshold=s.node_threshold,
            edge_threshold=s.edge_threshold,
            labels=self.labels,
            metadata=metadata,
        )
        return AttributionResult(prompt, ids, graph, replacement, completeness, document)

    def save(self, result: AttributionResult, out: str | Path) -> Path:
        """Write <slug>.json (the graph) and <slug>.pt (the raw graph, for re-pruning) into `out`."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        slug = result.json["metadata"]["slug"]
        raw = out / f"{slug}.pt"
        result.graph.to_pt(str(raw.with_suffix(".pt.tmp")))
        os.replace(raw.with_suffix(".pt.tmp"), raw)
        result.json["metadata"]["raw_graph"] = raw.name
        path = out / f"{slug}.json"
        scratch = path.with_suffix(".json.tmp")
        scratch.write_text(json.dumps(result.json, indent=1))
        os.replace(scratch, path)
        return path

    # ---- interventions ---------------------------------------------------------------------

    def intervene(self, prompt: str | list[int], edits: list[FeatureEdit], **options: Any) -> InterventionResult:
        ids = self.tokens(prompt) if isinstance(prompt, str) else prompt
        return intervene(self.model, ids, edits, **options)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clt-forge")
    except PackageNotFoundError:
        return "unknown"
