"""Render docs/configuration.md from the schemas and conf/ (a test keeps the file in sync).

Regenerate with: python -m clt_forge.config.reference > docs/configuration.md
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from enum import Enum

import yaml

from clt_forge.config import schema
from clt_forge.config.compose import GROUPS, conf_dir, group_options, load_choices
from clt_forge.config.schedules import SPARSITY_SCHEDULES, SparsityConfig
from clt_forge.registry import CHOICES

# Registry-valued keys whose allowed values the reference lists: the registries of the layers
# below the stages (always loaded here). explainer.kind's registry lives in a stage package.
DOCUMENTED_CHOICES = (
    "model.source",
    "data.source",
    "quant.scheme",
    "sparsity.schedule",
    "optim.lr_schedule",
    "clt.activation",
)

_FIELD = re.compile(r"^    (\w+): [^=]+?(?:= .*?)?(?:  # (.*))?$")


def field_comments(cls: typing.Any) -> dict[str, str]:
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = _FIELD.match(line)
        if match and match.group(2):
            comments[match.group(1)] = match.group(2)
    return comments


def type_name(tp: object, key: str = "") -> str:
    if key in DOCUMENTED_CHOICES:  # in registration order, built-ins only (a test may add more)
        registry = CHOICES[key]
        built_in = [name for name, entry in registry.items() if entry.__module__.startswith("clt_forge.")]
        return " \\| ".join([*built_in, *registry.extra])
    if isinstance(tp, type) and issubclass(tp, Enum):
        return " \\| ".join(member.value for member in tp)
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null").replace("|", "\\|")


def default_of(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
        return (
            "???"
            if value == "???"
            else yaml.safe_dump(value.value if isinstance(value, Enum) else value).split("\n")[0]
        )
    return "(section)"


def field_table(cls: typing.Any, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    comments = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            comments.update(field_comments(base))
    rows = []
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            if prefix == "" and field.name in GROUPS:
                continue  # groups have their own section
            rows += field_table(tp, f"{prefix}{field.name}.")
            continue
        rows.append(
            f"| `{prefix}{field.name}` | {type_name(tp, prefix + field.name)} | `{default_of(field)}` "
            f"| {comments.get(field.name, '')} |"
        )
    return rows


def schedule_rows() -> list[str]:
    """Each built-in sparsity schedule's own settings."""
    shared = {f.name for f in dataclasses.fields(SparsityConfig)}
    rows = []
    for name, cls in SPARSITY_SCHEDULES.items():
        if cls.__module__.startswith("clt_forge."):
            own = [r for r in field_table(cls, "sparsity.") if r.split("`")[1].split(".")[1] not in shared]
            rows += [_settings_of(r, name) for r in own]
    return rows


def _settings_of(row: str, schedule: str) -> str:
    """The row of a schedule's setting, its meaning prefixed with the schedule's name."""
    cells = row.split(" | ")
    cells[-1] = f"{schedule}: {cells[-1]}"
    return " | ".join(cells)


def render() -> str:
    load_choices()
    out = [
        "# Configuration reference",
        "",
        "Generated from `clt_forge/config/schema.py` and `conf/` by",
        "`python -m clt_forge.config.reference > docs/configuration.md`; a test fails when it drifts.",
        "",
        "Every stage composes the same groups (`conf/pipeline.yaml`), so one override list works for",
        "every stage: `clt cache model=gpt2 quant=int4`, `clt train model=gpt2 sharding=feature`.",
        "Choose a group option with `GROUP=OPTION`, set a key with `GROUP.KEY=VALUE`.",
        "",
        "## Config groups",
        "",
    ]
    header = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for group in GROUPS:
        cls = schema.GROUP_SCHEMAS[group]
        out += [f"### `{group}`", "", f"Options: {', '.join(f'`{o}`' for o in group_options(group))}.", ""]
        for option in group_options(group):
            values = yaml.safe_load((conf_dir() / group / f"{option}.yaml").read_text()) or {}
            schemas = [d for d in values.get("defaults", []) if isinstance(d, str) and d.startswith("schema_")]
            shown = ", ".join(
                [f"`schedule={d.removeprefix('schema_')}`" for d in schemas]
                + [f"`{k}={v}`" for k, v in values.items() if k != "defaults"]
            )
            out.append(f"- `{group}={option}`: {shown}")
        extra = schedule_rows() if group == "sparsity" else []
        out += ["", *header, *field_table(cls, f"{group}."), *extra, ""]
    out += [
        "### `hydra/launcher`",
        "",
        f"Options: {', '.join(f'`{o}`' for o in group_options('hydra/launcher'))}. `slurm` runs multirun sweeps as",
        "SLURM jobs through hydra-submitit-launcher (`conf/hydra/launcher/slurm.yaml`).",
        "",
        "## Stages",
        "",
        "Keys shared by every stage:",
        "",
        *header,
        *field_table(schema.PipelineConfig),
        "",
    ]
    shared = {f.name for f in dataclasses.fields(schema.PipelineConfig)}
    for stage, cls in schema.STAGE_SCHEMAS.items():
        own = [row for row in field_table(cls) if row.split("`")[1].split(".")[0] not in shared]
        out += [f"### `clt {stage}`", "", *header, *own, ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
