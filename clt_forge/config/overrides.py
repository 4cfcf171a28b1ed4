"""Writing Hydra override values: the one quoter of the `clt` command (free text such as prompts)
and of the commands `clt demo` prints, so that every value parses back to exactly what was meant.

Inside Hydra quotes a backslash is read literally, except in a run of backslashes just before a
quote or at the end of the value, where each pair stands for one backslash.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

# Free-text keys: their values are taken as written (commas, quotes, `=`, brackets), not as
# Hydra grammar; a value already in Hydra quotes ('...' or "...") is left for Hydra to unquote.
TEXT_KEYS = {"prompt"}


def hydra_quote(text: str) -> str:
    """`text` as a Hydra override value that parses back to exactly the string `text` (always
    quoted: unquoted, `true` or `12` would become a bool or an int)."""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text) + "'"


def parsed_value(value: str) -> Any:
    """What Hydra makes of `value` on the right of `key=`; a HydraException if it cannot parse."""
    return OverridesParser.create().parse_override(f"key={value}").value()


def hydra_value(value: Any) -> str:
    """`value` (a str, Path, number, bool or None) as an override value Hydra parses back to it:
    as written when Hydra reads it back unchanged (paths, names, numbers), else quoted."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = str(value) if isinstance(value, str | Path | int | float) else repr(value)
    want: Any = value if isinstance(value, int | float) else text
    try:
        plain = parsed_value(text)
    except HydraException:
        return hydra_quote(text)
    return text if type(plain) is type(want) and plain == want else hydra_quote(text)


def _hydra_quoted(value: str) -> bool:
    """Whether `value` is one quoted string in Hydra's grammar (`prompt='a, b'` as typed)."""
    if len(value) < 2 or value[0] not in "'\"" or value[-1] != value[0]:
        return False
    try:
        return isinstance(parsed_value(value), str)
    except HydraException:
        return False


def quote_text_values(overrides: list[str]) -> list[str]:
    """`prompt=Romeo, Romeo` -> `prompt='Romeo, Romeo'`: free text reaches the config as typed."""
    out = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+~") in TEXT_KEYS and value != "null" and not _hydra_quoted(value):
            override = f"{key}={hydra_quote(value)}"
        out.append(override)
    return out
