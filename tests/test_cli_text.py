"""Free text on the command line: prompts reach the config exactly as typed (issue 16)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from clt_forge.config.overrides import hydra_quote, quote_text_values

PROMPTS = [
    "Romeo, Romeo, wherefore art thou",
    'She said "yes", then left',
    "It's the cat's",
    "x = [1, 2] {a: b} (c)",
    "Füße, naïve café — 東京",
    "back\\slash at the end\\",
    "true",
    "12",
    "a,b='c'",
]


def composed_prompt(*args: str) -> str:
    """The prompt in the config `clt attribute ARGS --cfg job` composes, through the real CLI."""
    run = subprocess.run(
        [sys.executable, "-m", "clt_forge", "attribute", *args, "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return yaml.safe_load(run.stdout)["prompt"]


@pytest.mark.parametrize("text", PROMPTS)
def test_hydra_quote_parses_back_to_the_text(text):
    parsed = OverridesParser.create().parse_override(f"prompt={hydra_quote(text)}")
    assert parsed.value() == text


@pytest.mark.parametrize("text", PROMPTS)
def test_prompt_values_are_taken_as_written(text):
    (override,) = quote_text_values([f"prompt={text}"])
    assert OverridesParser.create().parse_override(override).value() == text


def test_hydra_quoted_prompts_keep_working_and_null_stays_null():
    assert quote_text_values(["prompt='Romeo, Romeo'"]) == ["prompt='Romeo, Romeo'"]
    assert quote_text_values(['prompt="a, b"']) == ['prompt="a, b"']
    assert quote_text_values(["prompt=null", "slug=a"]) == ["prompt=null", "slug=a"]


def test_the_cli_accepts_prompts_with_commas_quotes_and_brackets():
    # each of these exited with Hydra's "Ambiguous value for argument" or a parse error before
    assert composed_prompt("prompt=Romeo, Romeo, wherefore art thou") == "Romeo, Romeo, wherefore art thou"
    assert composed_prompt("prompt=x = [1, 2] 'q' \"dq\" — é") == "x = [1, 2] 'q' \"dq\" — é"
    assert composed_prompt("prompt='Romeo, Romeo'") == "Romeo, Romeo"  # Hydra's own quoting still works
    assert composed_prompt("--prompt", '\'tis "so", = [x]') == '\'tis "so", = [x]'  # verbatim, even quotes
