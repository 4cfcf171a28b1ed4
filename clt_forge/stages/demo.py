"""`clt demo`: the whole workflow on the embedded default, into one run folder.

    runs/demo/
      activations/          clt cache: the bundled text through the embedded model (+ held_out/)
      clt/                  clt train: metrics, plots, checkpoints/final (the CLT)
      graphs/<slug>.{json,pt}  clt attribute: the prompt's attribution graph
      features/             clt autointerp on the graph's features: features.db, summary.json
      quality.json          held-out EV / L0, the replacement model's KL / top-1, the graph's scores

The graph comes before autointerp so that the explainer spends its time on exactly the
features the graph shows; the graph's nodes are then labelled with their explanations. Each
step runs only when its output is missing (training resumes from its last checkpoint), so
re-running continues where an interrupted demo stopped. Every step prints the `clt` command
that does it alone, from the artifacts of the steps before.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from clt_forge.config.overrides import hydra_value
from clt_forge.config.schema import (
    AttributeConfig,
    AutointerpConfig,
    CacheConfig,
    DemoConfig,
    PipelineConfig,
    TrainConfig,
)
from clt_forge.runs import setup

STEPS = 6


def run(cfg: DemoConfig) -> Path:
    out = setup(cfg)
    acts, clt, graphs, features = out / "activations", out / "clt", out / "graphs", out / "features"
    final = clt / "checkpoints" / "final"
    graph = graphs / f"{cfg.slug}.json"
    started = time.perf_counter()

    cache = {"out": acts, "tokens": cfg.cache_tokens, "held_out_tokens": 2048}
    if _step(1, "cache", cache, done=(acts / "manifest.json").is_file()):
        from clt_forge.stages import cache as cache_stage

        cache_stage.run(stage_config(CacheConfig, cfg, cache))

    train = {
        "activations": acts,
        "out": clt,
        "tokens": cfg.train_tokens,
        "batch_size": cfg.batch_size,
        "optim.lr": cfg.lr,
        "optim.lr_schedule": "cosine",
        "layer_weights": list(cfg.layer_weights),
        "clt.d_features": cfg.clt.d_features,
        **{f"sparsity.{f.name}": getattr(cfg.sparsity, f.name) for f in dataclasses.fields(cfg.sparsity)},
        "eval_every": max(1, cfg.train_tokens // cfg.batch_size // 8),
        "log_every": 8,
        "checkpoint_every": 64,
    }
    if _step(2, "train", train, done=(final / "config.json").is_file()):
        from clt_forge.training.runner import CLTTrainingRunner, latest_checkpoint

        resume = {"resume": clt} if (clt / "checkpoints").is_dir() and latest_checkpoint(clt) else {}
        CLTTrainingRunner(stage_config(TrainConfig, cfg, {**train, **resume})).run()

    attribute: dict[str, Any] = {"checkpoint": final, "out": graphs, "prompt": cfg.prompt, "slug": cfg.slug}
    attribute["max_feature_nodes"] = cfg.max_feature_nodes
    if _step(3, "attribute", attribute, done=graph.is_file()):
        from clt_forge.stages import attribute as attribute_stage

        attribute_stage.run(stage_config(AttributeConfig, cfg, attribute))

    autointerp: dict[str, Any] = {"checkpoint": final, "activations": acts, "out": features, "features_from": graph}
    autointerp |= {"tokens": cfg.autointerp_tokens, "per_quantile": cfg.autointerp_per_quantile}
    if _step(4, "autointerp", autointerp, done=(features / "summary.json").is_file()):
        from clt_forge.autointerp.runner import AutoInterp

        AutoInterp(stage_config(AutointerpConfig, cfg, autointerp)).run(out=features)

    from clt_forge.attribution.labels import label_graph

    print(f"[5/{STEPS}] label the graph's features with their explanations")
    labelled = label_graph(graph, features / "features.db")
    print(f"{labelled} feature nodes of {graph} labelled.")

    from clt_forge.evaluation.summary import format_summary, quality_summary

    print(f"[6/{STEPS}] quality of the CLT (clt_forge/evaluation; benchmarks/quality.py measures more)")
    quality = quality_summary(final, acts / "held_out", cfg.data, [graph], windows=cfg.eval_windows)
    (out / "quality.json").write_text(json.dumps(quality, indent=1) + "\n")
    print(format_summary(quality))
    print(f"({(time.perf_counter() - started) / 60:.1f} min; figures in {out / 'quality.json'})")
    print(f"\nOpen it:\n  {clt_command()} serve {graph}")
    return out


# A key the printed command sets through its group option: a sparsity schedule is chosen with
# sparsity=NAME, whose YAML attaches the schema holding that schedule's own settings.
GROUP_OPTION_KEYS = {"sparsity.schedule": "sparsity"}


def _step(number: int, stage: str, overrides: dict[str, Any], done: bool) -> bool:
    words = [shell_quote(step_override(k, v)) for k, v in overrides.items()]
    command = " ".join([clt_command(), stage, *words])
    if done:
        print(f"[{number}/{STEPS}] {stage}: already done, skipped ({command})")
    else:
        print(f"[{number}/{STEPS}] {stage}: {command}", flush=True)
    return not done


def step_override(key: str, value: Any) -> str:
    """One word of a printed step command: KEY=VALUE that Hydra parses back to `value` exactly."""
    return f"{GROUP_OPTION_KEYS.get(key, key)}={hydra_value(value)}"


def clt_command() -> str:
    """`clt` when it is on PATH, else the path of the one running (e.g. .venv/bin/clt)."""
    if shutil.which("clt") or not sys.argv[0].endswith("clt"):
        return "clt"
    relative = os.path.relpath(sys.argv[0])
    return relative if not relative.startswith("..") else sys.argv[0]


def shell_quote(word: str) -> str:
    """A shell word that reads well: double quotes around words holding single quotes."""
    if "'" in word and not any(c in word for c in "$`\\!"):
        return '"' + word.replace('"', '\\"') + '"'
    return shlex.quote(word)


def stage_config(schema: type[Any], cfg: DemoConfig, overrides: dict[str, Any]) -> Any:
    """A stage's typed config: the demo's shared settings (model, data, quant, sparsity, clt,
    logger, seed, threads; the explainer for autointerp) with `overrides` (dotted keys) on top."""
    names = [f.name for f in dataclasses.fields(PipelineConfig)]
    if schema is AutointerpConfig:
        names.append("explainer")
    conf = OmegaConf.structured(schema)
    for name in names:
        conf[name] = getattr(cfg, name)
    for key, value in overrides.items():
        OmegaConf.update(conf, key, str(value) if isinstance(value, Path) else value, merge=True)
    return OmegaConf.to_object(conf)
