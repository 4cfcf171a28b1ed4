"""Where config files are: conf/ (in the wheel or beside the package) and any extra folders,
and the options of each config group (its YAML files). Composition is in compose.py."""

from __future__ import annotations

import functools
from pathlib import Path

GROUPS = ("model", "data", "quant", "sharding", "sparsity", "clt", "logger", "explainer")
EXTRA_CONF_DIRS: list[Path] = []  # searched after conf/, in order (add_config_dir)


@functools.cache
def conf_dir() -> Path:
    """conf/ inside the installed package (wheel) or beside it (source checkout)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "pipeline.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"clt-forge's conf/ folder is missing (looked in {here} and {here.parent})")


def add_config_dir(path: str | Path) -> None:
    """Search `path` too (after conf/) for group options: path/<group>/<name>.yaml."""
    folder = Path(path).resolve()
    if folder not in EXTRA_CONF_DIRS:
        EXTRA_CONF_DIRS.append(folder)


def conf_dirs() -> list[Path]:
    return [conf_dir(), *EXTRA_CONF_DIRS]


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files in conf/<group>/ and the extra config
    folders (plus Hydra's own)."""
    options = sorted({p.stem for folder in conf_dirs() for p in (folder / group).glob("*.yaml")})
    if group == "hydra/launcher":
        options = sorted({*options, "basic"})
    return options


def all_groups() -> dict[str, list[str]]:
    return {group: group_options(group) for group in (*GROUPS, "hydra/launcher")}


def option_file(group: str, name: str) -> Path | None:
    """The YAML file of option `name` of `group` (conf/ first, then the extra folders), if any."""
    return next((f for folder in conf_dirs() if (f := folder / group / f"{name}.yaml").is_file()), None)
