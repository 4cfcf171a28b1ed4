"""Activation codecs (clt_forge.artifacts.quant) on synthetic activations with planted outliers."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from clt_forge.artifacts import intcodes
from clt_forge.artifacts.quant import QUANTIZERS, IntQuantizer, QuantSpec, decode, encode, nmse, register_quantizer

SHAPE = (192, 6, 96)  # tokens, layers, d_model


def activations(shape: tuple[int, int, int] = SHAPE, seed: int = 0, massive: bool = True) -> torch.Tensor:
    """Heavy-tailed, residual-stream-like: layer l = layer l-1 plus an increment, per-channel scales
    over two decades, and (like MLP outputs) a handful of ~25,000-size values."""
    g = torch.Generator().manual_seed(seed)
    n_layers, d = shape[1:]
    scale = torch.exp(torch.randn(1, n_layers, d, generator=g))
    x = (torch.randn(shape, generator=g) * torch.exp(0.5 * torch.randn(shape, generator=g)) * scale).cumsum(1)
    if massive:
        flat = x.view(-1)
        pos = torch.randperm(flat.numel(), generator=g)[:6]
        flat[pos] = torch.tensor([25000.0, -18000.0, 9000.0, -4000.0, 30000.0, 12000.0])
    return x.contiguous()


def layer_records(blob: bytes, t: int, d: int, scale_bytes: int, code_bytes: int, beta_bytes: int = 0):
    """Walk a zstd_level=0 blob by the byte layout the module docstring documents."""
    magic, version, scheme, gran, flags, _, tokens, n_layers, d_model, n_out = struct.unpack_from("<4sBBBBIIIIQ", blob)
    assert (magic, version, tokens, d_model) == (b"CLTQ", 1, t, d)
    pos, records = 32, []
    for _ in range(n_layers):
        s, pos = blob[pos : pos + scale_bytes], pos + scale_bytes
        b, pos = blob[pos : pos + beta_bytes], pos + beta_bytes
        records.append((s, b, blob[pos : pos + code_bytes]))
        pos += code_bytes
    idx = np.cumsum(np.frombuffer(blob[pos : pos + 4 * n_out], dtype="<i4"))  # stored as deltas
    vals = np.frombuffer(blob[pos + 4 * n_out :], dtype="<f4")
    assert len(vals) == n_out
    return (scheme, gran, flags), records, idx, vals


SPECS = [  # (spec, bound on the nMSE of all values and of the bulk: all but the planted giants)
    (QuantSpec("none"), 1e-6),
    (QuantSpec("none", dtype="bfloat16"), 1e-4),
    (QuantSpec("int8", "layer"), 0.5),  # the paper: the giants set each layer's step, the bulk is lost
    (QuantSpec("int8", "row", outlier_fraction=1e-3, predict=True), 1e-3),
    (QuantSpec("int8", "layer", outlier_fraction=1e-4, predict=True), 1e-2),
    (QuantSpec("int4", "group", 32, outlier_fraction=1e-3), 3e-2),
    (
        QuantSpec("int4", "group", 40, outlier_fraction=1e-3, predict=True, scale_rule="mse"),
        3e-2,
    ),  # 40 does not divide 96
    (QuantSpec("int2", "group", 32, outlier_fraction=1e-3, predict=True, scale_rule="mse"), 0.2),
    (QuantSpec("int2", "row", zstd_level=0), 0.5),
    # the measured defaults (benchmarks/quant_codecs.py)
    (QuantSpec("int8", "layer", outlier_fraction=5e-4, predict=True), 3e-3),
    (QuantSpec("int4", "row", outlier_fraction=1e-3, predict=True, scale_rule="mse"), 2e-2),
    (QuantSpec("int2", "row", outlier_fraction=1e-3, predict=True, scale_rule="mse"), 0.2),
]


@pytest.mark.parametrize(
    ("spec", "bound"), SPECS, ids=[f"{s.scheme}-{s.granularity}-{s.group_size}-{s.predict}" for s, _ in SPECS]
)
def test_round_trip_shape_dtype_and_error(spec, bound):
    x = activations()
    y = decode(encode(x, spec), spec, SHAPE)
    assert y.shape == SHAPE and y.dtype == torch.float32 and y.is_contiguous()
    bulk = x.abs() < 1000  # all but the planted giants, which dominate the overall sum of squares
    assert nmse(x, y) < bound and nmse(x[bulk], y[bulk]) < bound


@pytest.mark.parametrize("predict", [False, True])
def test_int8_row_error_is_at_most_half_a_step(predict):
    x = activations(massive=False)
    spec = QuantSpec("int8", "row", zstd_level=0, predict=predict)
    blob = encode(x, spec)
    y = decode(blob, spec, SHAPE)
    t, _, d = SHAPE
    _, records, _, _ = layer_records(blob, t, d, scale_bytes=2 * t, code_bytes=t * d, beta_bytes=2 * d * predict)
    for layer, (s, _, codes) in enumerate(records):
        scale = torch.frombuffer(bytearray(s), dtype=torch.bfloat16).float()
        absmax = x[:, layer].abs().amax(1)
        assert torch.all(scale >= absmax / 127)  # bfloat16, rounded up: no code clips
        c = torch.frombuffer(bytearray(codes), dtype=torch.int8).view(t, d).float()
        if not predict:
            assert torch.all(scale <= absmax / 127 * (1 + 2**-7)) and c.abs().max() == 127
            assert torch.equal(y[:, layer], c * scale[:, None])  # the documented layout
        err = (x[:, layer] - y[:, layer]).abs()
        assert torch.all(err <= scale[:, None] / 2 * (1 + 1e-5))
        assert (err / scale[:, None]).max() > 0.45  # it does round


@pytest.mark.parametrize("bits", [4, 2])
def test_packing_round_trip_every_code_and_the_documented_bit_order(bits):
    qmax = (1 << (bits - 1)) - 1
    codes = np.tile(np.arange(-qmax, qmax + 1, dtype=np.int8), 7)[:-1]  # all codes, count not a multiple of 8/bits
    packed = np.frombuffer(intcodes.pack(codes, bits), dtype=np.uint8)
    assert len(packed) == -(-len(codes) * bits // 8)
    assert np.array_equal(intcodes.unpack(memoryview(packed.tobytes()), bits, len(codes)), codes)
    first = {4: np.array([-3, 5], np.int8), 2: np.array([-1, 0, 1, 1], np.int8)}[bits]
    assert bytes(intcodes.pack(first, bits)) == {4: b"\x5d", 2: b"\x53"}[bits]  # first value in the low bits


@pytest.mark.parametrize("scheme", ["int4", "int2"])
def test_odd_d_model_and_token_counts(scheme):
    x = activations((7, 3, 5), massive=False)
    for spec in (QuantSpec(scheme, "row"), QuantSpec(scheme, "group", 2, predict=True), QuantSpec(scheme, "layer")):
        y = decode(encode(x, spec), spec, (7, 3, 5))
        assert y.shape == (7, 3, 5) and nmse(x, y) < {"int4": 0.05, "int2": 0.5}[scheme]


def test_outliers_are_stored_and_restored_exactly():
    x = activations()
    giants = x.abs() > 1000
    assert giants.sum() == 6
    spec = QuantSpec("int2", "group", 32, outlier_fraction=1e-4, zstd_level=0)  # round(1e-4 * 110592) = 11
    blob = encode(x, spec)
    _, _, idx, vals = layer_records(blob, SHAPE[0], SHAPE[2], 2 * SHAPE[0] * 3, SHAPE[0] * SHAPE[2] // 4)
    assert len(idx) == 11 and np.all(np.diff(idx) > 0)
    assert set(torch.nonzero(giants.view(-1)).view(-1).tolist()) <= set(idx.tolist())
    assert np.array_equal(vals, x.view(-1)[torch.from_numpy(idx.astype(np.int64))].numpy())
    y = decode(blob, spec, SHAPE)
    assert torch.equal(y[giants], x[giants])
    # the giants' neighbours: without outliers the giant sets their int2 group's scale and they are lost
    groups = giants.view(*SHAPE[:2], 3, 32).any(3, keepdim=True).expand(*SHAPE[:2], 3, 32).reshape(SHAPE) & ~giants
    plain = decode(encode(x, QuantSpec("int2", "group", 32)), QuantSpec("int2", "group", 32), SHAPE)
    assert nmse(x[groups], plain[groups]) == 1.0 and nmse(x[groups], y[groups]) < 0.5


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_layer_granularity_is_the_papers_scheme(bits):
    x = activations()
    qmax = (1 << (bits - 1)) - 1
    scale = x.abs().amax(dim=(0, 2), keepdim=True) / qmax  # one absmax scale per layer per chunk
    reference = torch.round(x / scale).clamp(-qmax, qmax) * scale
    spec = QuantSpec(f"int{bits}", "layer")
    assert torch.equal(decode(encode(x, spec), spec, SHAPE), reference)


def test_finer_granularity_beats_layer_on_heavy_tails():
    x = activations()
    err = {}
    for name, spec in {
        "layer": QuantSpec("int4", "layer"),
        "row": QuantSpec("int4", "row"),
        "group": QuantSpec("int4", "group", 16),
        "outliers": QuantSpec("int4", "group", 16, outlier_fraction=1e-4),
    }.items():
        err[name] = nmse(x[:, 1:], decode(encode(x, spec), spec, SHAPE)[:, 1:])
    assert err["row"] < err["layer"] / 3 and err["group"] < err["row"] / 2 and err["outliers"] < err["group"]


def test_prediction_shrinks_correlated_layers_without_changing_the_error_much():
    x = activations(massive=False)
    plain, pred = QuantSpec("int8", "row"), QuantSpec("int8", "row", predict=True)
    a, b = encode(x, plain), encode(x, pred)
    assert len(b) < 0.9 * len(a)
    assert nmse(x, decode(b, pred, SHAPE)) < 2 * nmse(x, decode(a, plain, SHAPE))


def test_mse_scales_beat_absmax_at_int2():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    absmax, mse = QuantSpec("int2", "group", 32), QuantSpec("int2", "group", 32, scale_rule="mse")
    assert nmse(x, decode(encode(x, mse), mse, SHAPE)) < 0.6 * nmse(x, decode(encode(x, absmax), absmax, SHAPE))


def test_zstd_level_0_is_the_raw_payload():
    x = activations()
    raw, packed = QuantSpec("int4", "group", 32, zstd_level=0), QuantSpec("int4", "group", 32)
    blob = encode(x, raw)
    assert blob[:4] == b"CLTQ" and len(blob) == 32 + 6 * (2 * 192 * 3 + 192 * 96 // 2)
    z = encode(x, packed)
    assert z[:4] == b"\x28\xb5\x2f\xfd" and len(z) < len(blob)
    assert torch.equal(decode(blob, raw, SHAPE), decode(z, packed, SHAPE))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_none_is_exact_to_the_storage_dtype(dtype):
    x = activations()
    spec = QuantSpec("none", dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    assert torch.equal(decode(encode(x, spec), spec, SHAPE), x.to(torch_dtype).float())


@pytest.mark.parametrize("level", [0, 3])
def test_damaged_blobs_raise_a_clear_value_error(level):
    x = activations()
    spec = QuantSpec("int8", "row", outlier_fraction=1e-4, zstd_level=level)
    blob = encode(x, spec)
    with pytest.raises(ValueError, match="truncated"):
        decode(blob[: len(blob) - 100], spec, SHAPE)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    if level:  # the zstd frame checksum catches any flipped bit
        with pytest.raises(ValueError, match="corrupt"):
            decode(bytes(flipped), spec, SHAPE)
    with pytest.raises(ValueError, match="not a clt_forge quant blob"):
        decode(b"garbage" * 10, spec, SHAPE)
    with pytest.raises(ValueError, match="scheme"):
        decode(blob, QuantSpec("int4", "row", outlier_fraction=1e-4, zstd_level=level), SHAPE)
    with pytest.raises(ValueError, match="tokens"):
        decode(blob, spec, (SHAPE[0] + 1, *SHAPE[1:]))


def test_bad_specs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="scheme"):
        QuantSpec("int3")
    with pytest.raises(ValueError, match="granularity"):
        QuantSpec("int8", "channel")
    with pytest.raises(ValueError, match="scale_rule"):
        QuantSpec("int8", "layer", scale_rule="mse")
    x = activations()
    x[3, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        encode(x, QuantSpec("int8"))
    with pytest.raises(ValueError, match="float32"):
        encode(activations().half(), QuantSpec("int8"))
    with pytest.raises(ValueError, match="each >= 1"):
        encode(torch.zeros(0, 6, 96), QuantSpec("int8"))


def test_a_new_quantizer_is_one_small_class():
    @register_quantizer("int8_test")
    class Int8Test(IntQuantizer):
        code, bits = 200, 8

    try:
        spec = QuantSpec("int8_test", "row")
        x = activations()
        assert torch.equal(
            decode(encode(x, spec), spec, SHAPE), decode(encode(x, QuantSpec("int8")), QuantSpec("int8"), SHAPE)
        )
        with pytest.raises(ValueError, match="already registered"):
            register_quantizer("int8_test")(Int8Test)
    finally:
        QUANTIZERS.pop("int8_test")
