"""Locate conf/, register the schemas, and validate overrides before Hydra runs a stage.

Validation composes every job of the request with Hydra's compose API first, so a wrong
group option, unknown key or badly typed value stops the command at start-up with one
paragraph naming the key and what is allowed, instead of a traceback deep inside a run.
Values that name a registry entry (quant.scheme, sparsity.schedule, optim.lr_schedule,
model.source, explainer.kind, ...) are checked against every registry loaded in the process
(clt_forge.registry.CHOICES); validation loads those of the layers below the stages itself.

Extra config folders (`add_config_dir`) are searched after conf/, so a project or a test adds a
group option (conf/<group>/<name>.yaml) without touching the package.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clt_forge.config.files import EXTRA_CONF_DIRS, GROUPS, add_config_dir, all_groups, conf_dir, group_options
from clt_forge.config.schedules import SPARSITY_SCHEDULES
from clt_forge.config.schema import STAGE_SCHEMAS
from clt_forge.errors import CLTError, ConfigError
from clt_forge.registry import CHOICES

__all__ = [  # where config files are (files.py) is part of this module's API
    "GROUPS",
    "add_config_dir",
    "all_groups",
    "compose_stage",
    "conf_dir",
    "group_options",
    "load_config",
    "validate",
]

MAX_VALIDATED_JOBS = 256


def register_schemas() -> None:
    """Store the stage schemas, and each sparsity schedule's class as `sparsity/schema_<name>` (the
    schema its YAML lists in its defaults). Cheap, so it runs before every composition: a schedule
    registered at any time is found."""
    store = ConfigStore.instance()
    for stage, schema in STAGE_SCHEMAS.items():
        store.store(name=f"{stage}_schema", node=schema)
    for name, schedule in SPARSITY_SCHEDULES.items():
        store.store(group="sparsity", name=f"schema_{name}", node=schedule)


def load_choices() -> None:
    """Import the modules of the layers below the stages that register built-in choices (the
    quantizers, the CLT activation functions, the model sources, the text sources), so
    validation knows their names."""
    import clt_forge.artifacts.quant
    import clt_forge.clt.activations
    import clt_forge.data.text
    import clt_forge.models  # noqa: F401


def compose_stage(stage: str, overrides: list[str]) -> DictConfig:
    """The composed job config of one stage (no Hydra run, no side effects)."""
    register_schemas()
    if EXTRA_CONF_DIRS:
        searchpath = ",".join(f"file://{folder}" for folder in EXTRA_CONF_DIRS)
        overrides = [*overrides, f"hydra.searchpath=[{searchpath}]"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name=stage):
        return compose(config_name=stage, overrides=overrides)


def load_config(stage: str, *overrides: str) -> Any:
    """A stage's typed config (e.g. TrainConfig), composed from conf/ with CLI-style overrides:
    `load_config("autointerp", "model=tiny", "tokens=2048")`. Bad overrides raise ConfigError."""
    from omegaconf import OmegaConf

    validate(stage, list(overrides))
    return OmegaConf.to_object(compose_stage(stage, list(overrides)))


def split_jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job a (multi)run would launch, as Hydra's basic sweeper."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = OverridesParser.create().parse_overrides(overrides)
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [job for batch in batches for job in batch]


def validate(stage: str, overrides: list[str], multirun: bool = False) -> int:
    """Compose every job of the request; raise ConfigError naming the bad key. Returns #jobs."""
    try:
        jobs = split_jobs(overrides, multirun)
    except HydraException as err:
        raise ConfigError(f"clt {stage}: cannot parse the overrides {overrides}: {err}") from None
    load_choices()
    for job in jobs[:MAX_VALIDATED_JOBS]:
        try:
            cfg = compose_stage(stage, job)
        except MissingConfigException as err:
            raise ConfigError(_missing_option_message(stage, err)) from None
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(_value_message(stage, job, err)) from None
        check_choices(stage, cfg, job)
        try:
            OmegaConf.to_object(cfg)  # checks every typed field, MISSING values included
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(_value_message(stage, job, err)) from None
        except (ValueError, CLTError) as err:  # a schema's own check (__post_init__)
            raise ConfigError(f"clt {stage}: invalid configuration: {err}. {_given(job)}") from None
    return len(jobs)


def check_choices(stage: str, cfg: DictConfig, job: list[str]) -> None:
    """Every value naming a registry entry names a registered one (registries loaded so far)."""
    for key, registry in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and str(value) not in registry.allowed():
            raise ConfigError(f"clt {stage}: {registry.message(value)}. {_given(job)}")


def _given(job: list[str]) -> str:
    return f"Overrides given: {' '.join(job) or '(none)'}."


def _missing_option_message(stage: str, err: MissingConfigException) -> str:
    text = str(err)
    match = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if match is None:
        return f"clt {stage}: {text}"
    group, value = match.groups()
    allowed = ", ".join(group_options(group))
    return (
        f"clt {stage}: unknown {group} '{value}'. "
        f"Allowed values for {group}: {allowed}. "
        f"Each is a file in {conf_dir() / group}; add one there (or in a folder given to add_config_dir) "
        f"to define a new {group}."
    )


def _value_message(stage: str, job: list[str], err: Exception) -> str:
    cause: Any = err.__cause__ if err.__cause__ is not None else err
    key = getattr(cause, "full_key", None) or _key_from_text(str(cause))
    detail = getattr(cause, "msg", None) or str(cause)
    lines = [line.strip() for line in detail.split("\n") if line.strip()] or [""]
    detail = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # Hydra's "... composing config:"
    hint = _allowed_keys_hint(stage, key) if "not in" in detail or "not in struct" in detail else ""
    where = f" (key '{key}')" if key else ""
    return f"clt {stage}: invalid configuration{where}: {detail}.{hint} {_given(job)}"


def _key_from_text(text: str) -> str | None:
    match = re.search(r"[Kk]ey '([^']+)'", text) or re.search(r"override '([^']+)'", text)
    return match.group(1) if match else None


def _allowed_keys_hint(stage: str, key: str | None) -> str:
    """List the keys that do exist next to an unknown one, from the schema dataclasses."""
    if not key:
        return ""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    node: Any = STAGE_SCHEMAS[stage]
    for part in filter(None, parent.split(".")):
        node = typing.get_type_hints(node).get(part) if dataclasses.is_dataclass(node) else None
    if not dataclasses.is_dataclass(node):
        return ""
    where = f"'{parent}'" if parent else f"clt {stage}"
    return f" Keys allowed in {where}: {', '.join(sorted(f.name for f in dataclasses.fields(node)))}."
