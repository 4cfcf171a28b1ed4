"""`clt attribute`: attribution graphs from a CLT checkpoint (see clt_forge/attribution/).

Writes, into the output folder: <slug>.json (the pruned graph, Neuronpedia schema) and
<slug>.pt (circuit-tracer's raw graph, for re-pruning) per prompt, and with `export=DIR`
the CLT in circuit-tracer's on-disk format.
"""

from __future__ import annotations

import gc
from pathlib import Path

from clt_forge.artifacts.checkpoint import read_info
from clt_forge.attribution.convert import export_circuit_tracer
from clt_forge.attribution.runner import AttributionRunner, slugify
from clt_forge.config.schema import AttributeConfig
from clt_forge.errors import CLTError
from clt_forge.models.loading import checkpoint_model_config
from clt_forge.runs import setup


def run(cfg: AttributeConfig) -> Path:
    out = setup(cfg)
    if not cfg.checkpoint:
        raise CLTError("clt attribute needs checkpoint=PATH (a CLT checkpoint folder written by `clt train`).")
    prompts = _prompts(cfg)
    if cfg.export:
        path = export_circuit_tracer(cfg.checkpoint, cfg.export)
        print(f"circuit-tracer CLT written to {path}")
    if not prompts:
        return out
    labels = _labels(cfg.features)
    # AttributeConfig is an AttributionSettings: the runner reads its settings from it directly
    recorded = read_info(cfg.checkpoint).model  # an imported CLT naming no model runs on model=
    model_name = None if recorded else checkpoint_model_config(recorded, cfg.model, cfg.checkpoint).name
    runner = AttributionRunner(
        cfg.checkpoint,
        model_name,
        device=cfg.device,
        labels=labels,
        features_path=cfg.features,
        settings=cfg,
    )
    slugs = _slugs(cfg, prompts)
    for prompt, slug in zip(prompts, slugs, strict=True):
        result = runner.run(prompt, slug=slug)
        path = runner.save(result, out)
        print(
            f"graph written to {path} (replacement {result.replacement_score:.3f}, "
            f"completeness {result.completeness_score:.3f}); open it with: clt serve {path}"
        )
    del runner  # circuit-tracer's ReplacementModel.__del__ fails if it runs at interpreter exit
    gc.collect()
    return out


def _prompts(cfg: AttributeConfig) -> list[str]:
    if cfg.prompts:
        path = Path(cfg.prompts)
        if not path.is_file():
            raise CLTError(f"prompts={path}: no such file (one prompt per line).")
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise CLTError(f"prompts={path}: the file has no prompts (one per line).")
        return prompts
    return [cfg.prompt] if cfg.prompt else []


def _slugs(cfg: AttributeConfig, prompts: list[str]) -> list[str]:
    if cfg.slug and len(prompts) == 1:
        return [cfg.slug]
    slugs: list[str] = []
    for i, prompt in enumerate(prompts):
        slug = f"{cfg.slug}-{i}" if cfg.slug else slugify(prompt)
        while slug in slugs:
            slug = f"{slug}-{i}"
        slugs.append(slug)
    return slugs


def _labels(features: str | None) -> dict[tuple[int, int], str]:
    if not features:
        return {}
    from clt_forge.artifacts.features import read_explanations

    return read_explanations(features)
