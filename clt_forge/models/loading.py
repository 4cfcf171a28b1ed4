"""`load_model`: one entry point over a registry of loaders, one per `model.source`.

A new kind of model is one function registered with `@register_loader("name")` (selected by
`model.source: name` in conf/model/<model>.yaml) returning a HookedTransformer built with
fold_ln=False (so the MLP input we read is the exact tensor the MLP sees, and the same one
circuit-tracer's ReplacementModel hooks). The built-in sources register when the package
`clt_forge.models` is imported (its __init__ imports gguf, hub and tiny); this module imports
none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from clt_forge.config.schema import ModelConfig
from clt_forge.errors import CLTError
from clt_forge.registry import Registry

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

Loader = Callable[[ModelConfig], "HookedTransformer"]
MODEL_LOADERS: Registry[Loader] = Registry("model.source")
register_loader = MODEL_LOADERS.register


def model_config(name: str, **overrides: object) -> ModelConfig:
    """The ModelConfig of a configured model (conf/model/<name>.yaml), with overrides."""
    from omegaconf import OmegaConf

    from clt_forge.config.files import conf_dir, group_options, option_file

    path = option_file("model", name)
    if path is None:
        raise CLTError(
            f"unknown model '{name}'. Configured models: {', '.join(group_options('model'))} "
            f"(files in {conf_dir() / 'model'})."
        )
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path), overrides)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def recorded_model_config(recorded: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig an artifact recorded (a checkpoint's `model`, a manifest's plan). An
    imported CLT records only the hub name of its model: the configured model with that
    `hf_name` stands in for it."""
    from omegaconf import OmegaConf

    if "name" not in recorded and "hf_name" in recorded:
        return _configured_for(str(recorded["hf_name"]))
    if "name" not in recorded:
        from clt_forge.config.files import group_options

        hub = ", ".join(f"{c.hf_name} ({c.name})" for c in map(model_config, group_options("model")) if c.hf_name)
        raise CLTError(
            "the checkpoint records no language model (an imported CLT whose config.yaml / clt_cfg.json has "
            f"no model_name). Add `model_name: <hub id>` to it, one of the configured models': {hub}."
        )
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(recorded))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def checkpoint_model_config(recorded: Mapping[str, Any], configured: ModelConfig, checkpoint: object) -> ModelConfig:
    """The model a checkpoint was made for: the one it records, else (an imported CLT whose config
    names no model) the configured `model=`, which the caller checks against the CLT (d_model,
    n_layers, hooks: `check_model_matches`) before any heavy work."""
    if recorded:
        return recorded_model_config(recorded)
    print(f"note: {checkpoint} names no language model: using model={configured.name} (checked against the CLT).")
    return configured


def _configured_for(hf_name: str) -> ModelConfig:
    from clt_forge.config.files import conf_dir, group_options

    configs = [model_config(name) for name in group_options("model")]
    found = [cfg for cfg in configs if cfg.hf_name == hf_name]
    if not found:
        raise CLTError(
            f"the checkpoint was made for the model {hf_name!r}, and no model config has that hf_name "
            f"(configured: {', '.join(f'{c.name} ({c.hf_name})' for c in configs)}). Add "
            f"conf/model/<name>.yaml with that hf_name for it (in {conf_dir() / 'model'})."
        )
    return found[0]


def load_model(model: str | ModelConfig = "smollm2_135m", **overrides: object) -> HookedTransformer:
    """The paper's `load_model`: a configured model by name (or a ModelConfig) as a HookedTransformer."""
    cfg = model if isinstance(model, ModelConfig) else model_config(model, **overrides)
    model_out = MODEL_LOADERS.lookup(cfg.source)(cfg)
    _check_shape(cfg, model_out)
    model_out.eval()
    return model_out


def torch_dtype(cfg: ModelConfig) -> torch.dtype:
    import torch

    return getattr(torch, cfg.dtype.value)


def _check_shape(cfg: ModelConfig, model: HookedTransformer) -> None:
    got = {"n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model, "d_mlp": model.cfg.d_mlp}
    want = {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "d_mlp": cfg.d_mlp}
    if got != want:
        raise CLTError(
            f"model '{cfg.name}' loaded with {got}, but its config declares {want}: fix conf/model/{cfg.name}.yaml."
        )
