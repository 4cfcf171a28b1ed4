"""docs/extending.md, run: a quantizer, a sparsity schedule, an lr schedule and an explainer added
from this file alone (one registered class or function each, plus a YAML file in an extra config
folder), selected through the config, validated at start-up, and used."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from clt_forge.artifacts.quant import QUANTIZERS, IntQuantizer, QuantSpec, decode, encode, register_quantizer
from clt_forge.autointerp.explainers import EXPLAINERS, Explainer, make_explainer
from clt_forge.config import files
from clt_forge.config.compose import add_config_dir, load_config, validate
from clt_forge.config.schedules import LR_SCHEDULES, SPARSITY_SCHEDULES, SparsityConfig, register_sparsity
from clt_forge.config.schema import ExplainerConfig
from clt_forge.errors import ConfigError
from clt_forge.training.schedules import l0_coefficient, lr_multiplier

YAMLS = {
    "quant/int8_rows.yaml": "scheme: int8_rows\ngranularity: row\noutlier_fraction: 1.0e-3\n",
    "sparsity/step.yaml": "defaults:\n  - schema_step\n  - _self_\nat_fraction: 0.25\n",
    "explainer/echo.yaml": "kind: echo\nmodel: none\n",
}


class Echo(Explainer):
    """Explains every feature by the last line of its prompt; says yes to everything."""

    def __init__(self, cfg: ExplainerConfig) -> None:
        self.cfg = cfg

    def explain(self, messages_batch: Sequence[Sequence[dict[str, str]]]) -> list[str]:
        return [messages[-1]["content"].splitlines()[-1] for messages in messages_batch]

    def judge(self, questions: Sequence[Sequence[dict[str, str]]]) -> list[float]:
        return [1.0] * len(questions)


@pytest.fixture
def extended(tmp_path: Path) -> Iterator[None]:
    """Register one of each and put their YAML files in an extra config folder; undo both after."""

    @register_quantizer("int8_rows")
    class Int8Rows(IntQuantizer):
        """int8 with one scale per token row, and nothing else."""

        code, bits = 201, 8

        @classmethod
        def check(cls, spec: QuantSpec) -> None:
            super().check(spec)
            if spec.granularity != "row":
                raise ValueError(f"quant.granularity={spec.granularity!r}: int8_rows has one scale per row")

    @register_sparsity("step")
    @dataclass
    class Step(SparsityConfig):
        """0, then lambda0 from at_fraction of training on."""

        schedule: str = "step"
        at_fraction: float = 0.5  # its own setting, checked with it

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0.0 <= self.at_fraction <= 1.0:
                raise ValueError(f"sparsity.at_fraction={self.at_fraction}: expected a fraction in [0, 1]")

        def multiplier(self, progress: float) -> float:
            return 1.0 if progress >= self.at_fraction else 0.0

    @LR_SCHEDULES.register("halving")
    def halving(progress: float, final: float) -> float:
        """Halve the lr at each quarter of training (never below the final fraction)."""
        return max(final, 0.5 ** math.floor(4 * progress))

    EXPLAINERS.register("echo")(Echo)
    for name, text in YAMLS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    add_config_dir(tmp_path)
    try:
        yield
    finally:
        files.EXTRA_CONF_DIRS.remove(tmp_path.resolve())
        for registry, name in (
            (QUANTIZERS, "int8_rows"),
            (SPARSITY_SCHEDULES, "step"),
            (LR_SCHEDULES, "halving"),
            (EXPLAINERS, "echo"),
        ):
            registry.pop(name)


def test_a_new_quantizer_encodes_and_decodes_with_the_spec_from_the_config(extended):
    validate("cache", ["quant=int8_rows"])
    spec = load_config("cache", "quant=int8_rows").quant
    assert isinstance(spec, QuantSpec) and spec.scheme == "int8_rows" and spec.outlier_fraction == 1e-3
    x = torch.randn(64, 3, 32).cumsum(1).contiguous()
    x[5, 1, 7] = 4000.0  # an outlier: stored exactly
    blob = encode(x, spec)
    raw = encode(x, QuantSpec(**{**vars(spec), "zstd_level": 0}))
    assert struct.unpack_from("<4sBB", raw)[2] == 201  # the new scheme's header code
    y = decode(blob, spec, (64, 3, 32))
    assert y[5, 1, 7] == 4000.0
    err = (x - y).abs() / x.abs().amax(2, keepdim=True)  # at most half a step of each row's scale
    assert float(err.max()) <= 0.5 / 127 * 1.01
    with pytest.raises(ConfigError, match="int8_rows has one scale per row"):
        validate("cache", ["quant=int8_rows", "quant.granularity=layer"])


def test_a_new_sparsity_schedule_brings_its_own_setting(extended):
    cfg = load_config("train", "sparsity=step", "sparsity.l0_coefficient=3")
    assert type(cfg.sparsity).__name__ == "Step" and cfg.sparsity.at_fraction == 0.25  # from its YAML
    assert [l0_coefficient(s, 100, cfg.sparsity) for s in (0, 24, 25, 99)] == [0.0, 0.0, 3.0, 3.0]
    later = load_config("train", "sparsity=step", "sparsity.at_fraction=0.5").sparsity
    assert [l0_coefficient(s, 100, later) for s in (49, 50)] == [0.0, 2.0]
    with pytest.raises(ConfigError, match=r"sparsity\.at_fraction"):  # validated with the schedule
        validate("train", ["sparsity=step", "sparsity.at_fraction=1.5"])
    with pytest.raises(ConfigError, match="at_fraction"):  # another schedule has no such key
        validate("train", ["sparsity=constant", "sparsity.at_fraction=0.5"])


def test_a_new_lr_schedule_gives_the_expected_multipliers(extended):
    optim = load_config("train", "optim.lr_schedule=halving", "optim.lr_warmup_fraction=0").optim
    assert [lr_multiplier(s, 100, optim) for s in (0, 24, 25, 50, 99)] == [1.0, 1.0, 0.5, 0.25, 0.125]


def test_a_new_explainer_is_picked_by_the_factory(extended):
    cfg = load_config("autointerp", "explainer=echo")
    explainer = make_explainer(cfg.explainer)
    assert isinstance(explainer, Echo)
    assert explainer.explain([[{"role": "user", "content": "examples\nthe word 'large'"}]]) == ["the word 'large'"]


@pytest.mark.parametrize(
    ("stage", "override", "key", "new"),
    [
        ("cache", "quant.scheme=int9", "quant.scheme", "int8_rows"),
        ("train", "sparsity.schedule=sawtooth", "sparsity.schedule", "step"),
        ("train", "optim.lr_schedule=wavy", "optim.lr_schedule", "halving"),
        ("autointerp", "explainer.kind=oracle", "explainer.kind", "echo"),
    ],
)
def test_a_wrong_value_fails_at_start_up_listing_the_new_one(extended, stage, override, key, new):
    with pytest.raises(ConfigError) as err:
        validate(stage, [override])
    message = str(err.value)
    assert f"'{override.split('=')[1]}'" in message and f"Allowed values for {key}:" in message
    allowed = message.split(f"Allowed values for {key}: ")[1].split(".")[0].split(", ")
    assert new in allowed and len(allowed) >= 3, allowed  # the built-ins and the new one


def test_a_wrong_group_option_lists_the_new_yaml(extended):
    with pytest.raises(ConfigError, match=r"unknown sparsity 'sawtooth'.*constant.*step"):
        validate("train", ["sparsity=sawtooth"])
