"""What the activation codecs refuse, and the bound the default one keeps (issue 16): values a
codec cannot store faithfully (NaN, inf, float16 overflow) fail at write time naming the layer
and kind, never later as the trainer's "mse is inf"; the default int8 codec's error is at most
half a step on every element."""

from __future__ import annotations

import struct

import pytest
import torch
from test_quant import SHAPE, activations

from clt_forge.artifacts.activations import decode_chunk, encode_chunk
from clt_forge.artifacts.quant import HEADER, QuantSpec, _decompress, decode, encode
from clt_forge.config.compose import compose_stage
from clt_forge.errors import CLTError


def default_spec() -> QuantSpec:
    """The quantization `clt cache` uses when none is chosen."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(compose_stage("cache", [])).quant


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("int8", "layer", outlier_fraction=5e-4, predict=True),
        QuantSpec("int4", "row", outlier_fraction=1e-3),
        QuantSpec("int2", "group", group_size=32, outlier_fraction=1e-2, predict=True),
        QuantSpec("none", dtype="float32"),
        QuantSpec("none", dtype="bfloat16"),
    ],
)
def test_nan_and_inf_are_refused_with_outliers_on(spec, bad):
    x = activations()
    x[5, 2, 7] = bad  # outliers are the largest |x|: an inf would be one of them
    with pytest.raises(ValueError, match=r"layer 2 .*(NaN|inf)"):
        encode(x, spec)


def test_float16_overflow_is_refused_naming_the_layer_value_and_fix():
    x = activations(massive=False)
    x[3, 4, 9] = 70000.0
    with pytest.raises(ValueError, match=r"layer 4 holds 70000.*float16.*65504.*bfloat16 or float32"):
        encode(x, QuantSpec("none", dtype="float16"))
    for dtype, rtol in (("float32", 0.0), ("bfloat16", 1 / 128)):  # the same values fit these
        spec = QuantSpec("none", dtype=dtype)
        torch.testing.assert_close(decode(encode(x, spec), spec, SHAPE), x, rtol=rtol, atol=0.0)


def test_a_chunk_names_the_kind_that_overflowed():
    x = activations(massive=False)
    big = x.clone()
    big[0, 1, 0] = 1e6
    tokens = torch.arange(SHAPE[0])
    with pytest.raises(CLTError, match=r"mlp_out: encode: layer 1 holds 1e\+06"):
        encode_chunk(tokens, x, big, QuantSpec("none", dtype="float16"))
    spec = QuantSpec("none", dtype="float16")
    decoded = decode_chunk(encode_chunk(tokens, x, x, spec), spec)
    assert torch.isfinite(decoded.mlp_out).all()


@pytest.mark.parametrize("spec", [QuantSpec("int8", "layer", predict=True), QuantSpec("int4", "row", predict=True)])
def test_an_all_zero_layer_with_prediction_decodes_to_zeros(spec):
    x = activations(massive=False)
    x[:, 0] = 0.0  # no predictor for layer 1 (least squares on zeros)
    x[:, 3] = 0.0  # nothing to code
    y = decode(encode(x, spec), spec, SHAPE)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, 0], x[:, 0]) and torch.equal(y[:, 3], x[:, 3])


def layer_scales(blob: bytes, spec: QuantSpec) -> list[float]:
    """The float32 step of each layer, read from the blob as clt_forge/artifacts/quant.py documents
    it: a 32-byte header, then per layer a record of scale (f32), beta (bf16 x d_model when
    predicting) and the packed codes."""
    payload = memoryview(_decompress(blob).tobytes())
    header = HEADER.unpack_from(payload, 0)
    tokens, n_layers, d_model = header[6], header[7], header[8]  # after magic, version, 3 codes, group_size
    record = 4 + 2 * d_model * spec.predict + tokens * d_model  # int8: one byte a code
    return [struct.unpack_from("<f", payload, HEADER.size + layer * record)[0] for layer in range(n_layers)]


def test_the_default_int8_codec_errs_by_at_most_half_a_step_on_every_element():
    spec = default_spec()
    assert (spec.scheme, spec.granularity, spec.predict) == ("int8", "layer", True)  # what is checked here
    x = activations()
    blob = encode(x, spec)
    y = decode(blob, spec, SHAPE)
    scales = torch.tensor(layer_scales(blob, spec))
    err = (y - x).abs()
    kept = round(spec.outlier_fraction * x.numel())
    exact = x.view(-1).abs().topk(kept).indices  # the outliers: the largest |x| of the chunk
    assert kept > 0 and torch.equal(y.view(-1)[exact], x.view(-1)[exact])  # stored exactly
    bound = scales.view(1, -1, 1) / 2 * (1 + 1e-6) + 1e-6
    assert bool((err <= bound).all()), f"worst error / half step: {float((err / (scales.view(1, -1, 1) / 2)).max())}"
    assert float(scales.min()) > 0
