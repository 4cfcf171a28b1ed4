"""Attribution sized to the machine before it starts (issue 16): the estimate's inputs are the
prompt's real active features, the settings shrink to fit memory and time, and a run that cannot
fit is refused naming what to change."""

from __future__ import annotations

import dataclasses

import pytest
from test_attribute import PROMPT, QUICK, random_checkpoint

from clt_forge.attribution import budget
from clt_forge.attribution.budget import AttributionShape, Rates, choose, estimate, prompt_shape
from clt_forge.attribution.runner import AttributionRunner
from clt_forge.config.schema import AttributionSettings
from clt_forge.errors import CLTError

# SmolLM2-135M's sizes with the active features of a briefly trained CLT (~100k on 9 tokens)
SMOLLM = AttributionShape(tuple([3700] * 30), 9, 576, 1536, 9, 106_000_000)
RATES = Rates(flops=50e9, gather=0.15e9)


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> AttributionRunner:
    checkpoint = random_checkpoint(tmp_path_factory.mktemp("budget") / "ckpt", "tiny", d_features=96)
    return AttributionRunner(checkpoint, settings=QUICK)


def test_estimate_grows_with_batch_features_and_active_count():
    base = estimate(SMOLLM, 64, 512, 10, RATES)
    assert estimate(SMOLLM, 128, 512, 10, RATES).peak_bytes > base.peak_bytes
    assert estimate(SMOLLM, 64, 1024, 10, RATES).seconds > base.seconds
    busier = dataclasses.replace(SMOLLM, active_per_layer=tuple([7400] * 30))
    assert estimate(busier, 64, 512, 10, RATES).peak_bytes > 1.9 * base.peak_bytes * 0.9
    # the gradient gather of the last layer's hook: batch x all active features x d_model floats
    assert base.peak_bytes > 4 * 64 * SMOLLM.n_active * 576


def test_choose_keeps_what_fits_and_shrinks_what_does_not():
    asked = estimate(SMOLLM, 256, 2048, 10, RATES)
    assert choose(SMOLLM, 256, 2048, 10, RATES, asked.peak_bytes * 2, None) == asked
    tight = choose(SMOLLM, 256, 2048, 10, RATES, asked.peak_bytes / 4, None)
    assert tight.batch_size < 256 and tight.peak_bytes <= asked.peak_bytes / 4
    # the decoder rows and the edge matrix do not shrink with the batch: past them, nothing fits
    floor = choose(SMOLLM, 256, 2048, 10, RATES, 1e9, None)
    assert floor.batch_size == 8 and floor.peak_bytes > 1e9
    quick = choose(SMOLLM, 64, 2048, 10, RATES, 1e15, 900.0)
    assert quick.max_feature_nodes < 2048 and quick.seconds <= 900.0
    assert quick.batch_size == min(64, quick.max_feature_nodes)
    longer = estimate(SMOLLM, quick.batch_size, quick.max_feature_nodes + 1, 10, RATES)
    assert longer.seconds > 900.0  # the largest feature count that fits


def test_the_shape_counts_the_features_the_attribution_finds(runner):
    ids = runner.tokens(PROMPT)
    shape = prompt_shape(runner.model, ids)
    result = runner.run(PROMPT)
    layers = result.graph.active_features[:, 0]
    assert shape.n_active == len(layers) > 0
    assert list(shape.active_per_layer) == [int((layers == layer).sum()) for layer in range(shape.n_layers)]
    assert shape.n_pos == len(ids)


def test_time_cap_lowers_the_features_and_says_so(runner, capsys):
    runner.settings = dataclasses.replace(QUICK, batch_size=8, max_feature_nodes=None, max_minutes=1e-9)
    try:
        result = runner.run(PROMPT)
    finally:
        runner.settings = QUICK
    out = capsys.readouterr().out
    assert "attribution: " in out and "active features" in out and "(asked: " in out
    chosen = result.json["metadata"]["generation_settings"]
    assert chosen["max_feature_nodes"] == 8 == len(result.graph.selected_features)  # one batch, the floor
    assert "estimate" in chosen


def test_settings_over_the_memory_are_refused_naming_the_fix(runner):
    runner.settings = dataclasses.replace(QUICK, memory_fraction=1e-12)
    try:
        with pytest.raises(CLTError, match=r"active features.*allow_over_memory=true"):
            runner.run(PROMPT)
        runner.settings = dataclasses.replace(QUICK, memory_fraction=1e-12, allow_over_memory=True)
        assert runner.run(PROMPT).graph is not None
    finally:
        runner.settings = QUICK


def test_the_device_is_measured_once_per_runner_not_once_per_prompt(runner, monkeypatch):
    """`clt attribute prompts=FILE` runs every prompt through one runner: the ~0.4 s measurement of
    the device's rates happens at its first prompt only."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return RATES

    monkeypatch.setattr(budget, "measure_rates", counted)
    fresh = AttributionRunner(runner.clt_path, settings=dataclasses.replace(QUICK, max_feature_nodes=8, batch_size=8))
    for prompt in (PROMPT, "The cat sat", "Once upon a time"):
        assert fresh.run(prompt).graph is not None
    assert len(calls) == 1


def test_defaults_fit_a_two_core_machine():
    defaults = AttributionSettings()
    assert defaults.fit_to_machine and defaults.max_minutes is not None and defaults.max_minutes <= 10
