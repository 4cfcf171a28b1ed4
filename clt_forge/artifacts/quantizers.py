"""The quantizers: one registered class per `quant.scheme`, each reading (and checking) the
QuantSpec settings it uses. The blob they write is documented byte by byte in quant.py.

A new scheme is one class: `@register_quantizer("int6") class Int6(IntQuantizer): code, bits = 6, 6`
(a header code no other scheme uses), plus conf/quant/int6.yaml with `scheme: int6`.
"""

from __future__ import annotations

import math
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import ClassVar, NamedTuple

import torch

from clt_forge.artifacts.intcodes import as_bytes, bf16, empty, from_bf16, outliers, pack, unpack
from clt_forge.artifacts.quant_spec import QuantSpec, ScaleGranularity, ScaleRule
from clt_forge.registry import Registry

MAGIC, VERSION = b"CLTQ", 1
HEADER = struct.Struct("<4sBBBBIIIIQ")
GRANULARITIES = {"layer": 0, "row": 1, "group": 2}
DTYPES = {"float32": (0, torch.float32), "float16": (1, torch.float16), "bfloat16": (2, torch.bfloat16)}
MSE_ITERS = 2  # Lloyd steps for scale_rule="mse" (each one shrinks the step: less error, more bytes)
BLOCK_TOKENS = 128  # decode in token blocks that stay in cache between the multiply and the add
Parts = Iterator[bytes | memoryview]
Observer = Callable[[int, torch.Tensor], None]  # (layer, its [tokens, d_model] values), e.g. statistics


class Header(NamedTuple):
    scheme: int
    granularity: int
    flags: int
    group_size: int
    tokens: int
    n_layers: int
    d_model: int
    n_outliers: int

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, *self)


class Quantizer(ABC):
    """One scheme, registered under its name; `code` is its header byte."""

    name: ClassVar[str]
    code: ClassVar[int]

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec

    @classmethod
    def check(cls, spec: QuantSpec) -> None:
        """Raise ValueError naming the first setting of `spec` this scheme cannot use."""
        return None

    @abstractmethod
    def header(self, shape: tuple[int, int, int], n_outliers: int) -> Header: ...  # what a blob of this spec holds

    @abstractmethod
    def payload_size(self, h: Header) -> int: ...  # bytes after the header

    @abstractmethod
    def encode_payload(self, x: torch.Tensor, observe: Observer | None = None) -> tuple[Header, Parts]:
        """The header and the payload's parts; `observe` sees each layer's values once, as they are read."""

    @abstractmethod
    def decode_payload(self, buf: memoryview, h: Header) -> torch.Tensor: ...


QUANTIZERS: Registry[type[Quantizer]] = Registry("quant.scheme")


def register_quantizer(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    """Class decorator: the scheme `name` (quant.scheme=name) is coded by this class."""

    def add(cls: type[Quantizer]) -> type[Quantizer]:
        if any(q.code == cls.code for q in QUANTIZERS.values()):
            raise ValueError(f"quantizer {name!r}: header code {cls.code} is already registered")
        QUANTIZERS.register(name)(cls)
        cls.name = name
        return cls

    return add


def shape3(shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
    tokens, n_layers, d_model = shape
    return tokens, n_layers, d_model


@register_quantizer("none")
class RawQuantizer(Quantizer):
    """Values as they are, in `spec.dtype` (the one setting it reads; QuantSpec checks it)."""

    code = 0

    def header(self, shape: tuple[int, int, int], n_outliers: int) -> Header:
        return Header(self.code, DTYPES[self.spec.dtype][0], 0, 0, *shape, 0)

    def payload_size(self, h: Header) -> int:
        return h.tokens * h.n_layers * h.d_model * DTYPES[self.spec.dtype][1].itemsize

    def encode_payload(self, x: torch.Tensor, observe: Observer | None = None) -> tuple[Header, Parts]:
        if observe:
            for layer in range(x.shape[1]):
                observe(layer, x[:, layer])
        stored = x.to(DTYPES[self.spec.dtype][1])
        if not bool(torch.isfinite(stored).all()):  # NaN/inf in, or float16 overflow (|x| > 65504)
            raise ValueError(_not_finite(x, stored, self.spec.dtype))
        return self.header(shape3(x.shape), 0), iter([as_bytes(stored)])

    def decode_payload(self, buf: memoryview, h: Header) -> torch.Tensor:
        out = empty(h.tokens, h.n_layers, h.d_model)
        if len(buf):
            out.view(-1).copy_(torch.frombuffer(buf, dtype=DTYPES[self.spec.dtype][1]))
        return out


def _not_finite(x: torch.Tensor, stored: torch.Tensor, dtype: str) -> str:
    """Which layer of `x` did not survive being stored as `dtype`, and what to do instead."""
    bad = ~torch.isfinite(stored)
    layer = int(bad.any(dim=2).any(dim=0).nonzero()[0])
    value = float(x[:, layer][bad[:, layer]][0])
    if math.isfinite(value):
        return (
            f"encode: layer {layer} holds {value:.6g}, beyond {dtype}'s range (max {torch.finfo(stored.dtype).max:.6g}); "
            "store it as quant.dtype=bfloat16 or float32, or with an int scheme (outliers kept exactly)"
        )
    return f"encode: layer {layer} holds {value} (NaN or inf)"


class IntQuantizer(Quantizer):
    """Symmetric b-bit codes with scales, optional outliers and prediction; subclasses set `code` and `bits`."""

    bits: ClassVar[int]

    @classmethod
    def check(cls, spec: QuantSpec) -> None:
        for ok, field, expected in (
            (spec.granularity in GRANULARITIES, "granularity", f"one of {list(GRANULARITIES)}"),
            (isinstance(spec.group_size, int) and spec.group_size >= 1, "group_size", "an int >= 1"),
            (0.0 <= spec.outlier_fraction < 1.0, "outlier_fraction", "0 <= fraction < 1"),
            (spec.scale_rule in list(ScaleRule), "scale_rule", "'absmax' or 'mse'"),
            (
                spec.scale_rule == "absmax" or spec.granularity != ScaleGranularity.layer,
                "scale_rule",
                "'absmax' with granularity='layer'",
            ),
        ):
            if not ok:
                raise ValueError(f"quant.{field}={getattr(spec, field)!r}: expected {expected}")

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def header(self, shape: tuple[int, int, int], n_outliers: int) -> Header:
        s = self.spec
        flags = int(s.predict) | (2 if s.scale_rule == "mse" else 0)
        return Header(self.code, GRANULARITIES[s.granularity], flags, s.group_size, *shape, n_outliers)

    def _record(self, h: Header) -> tuple[int, int, int]:
        """Bytes of one layer record: scales, beta, codes."""
        g = self.spec.granularity
        scales = 4 if g == "layer" else 2 * h.tokens * (1 if g == "row" else -(-h.d_model // self.spec.group_size))
        return scales, 2 * h.d_model * self.spec.predict, -(-h.tokens * h.d_model * self.bits // 8)

    def payload_size(self, h: Header) -> int:
        return h.n_layers * sum(self._record(h)) + 8 * h.n_outliers

    def _grouped(self, v: torch.Tensor) -> torch.Tensor:
        """A layer [T, D] -> [1, 1, T*D] (layer), [T, 1, D] (row), [T, G, g] (group; zero-padded: zeros set no scale)."""
        g, (t, d) = self.spec.group_size, v.shape
        if self.spec.granularity != "group":
            return v.view(1, 1, -1) if self.spec.granularity == "layer" else v.unsqueeze(1)
        return (torch.nn.functional.pad(v, (0, g - d % g)) if d % g else v).view(t, -1, g)

    def _bcast(self, s: torch.Tensor, t: int, d: int) -> tuple[tuple[int, ...], torch.Tensor]:
        """The view of a [t, D] block, and of its scales ([1, 1] or [t, G]), that broadcast together."""
        g = self.spec.group_size
        if self.spec.granularity != "group" or g >= d:
            return (t, d), s[:, :1]
        if d % g == 0:
            return (t, d // g, g), s.unsqueeze(2)
        return (t, d), s.repeat_interleave(g, dim=1)[:, :d]

    def _fit(self, v: torch.Tensor) -> torch.Tensor:
        """Scales [T, G] (or [1, 1]) of a layer: absmax / qmax, then Lloyd steps for scale_rule=mse."""
        vg = self._grouped(v)
        s = torch.maximum(vg.amax(2), -vg.amin(2)) / self.qmax  # max |v| without an abs() copy (aminmax: 15x slower)
        for _ in range(MSE_ITERS if self.spec.scale_rule == "mse" else 0):
            c = (vg / s.clamp_min(1e-30).unsqueeze(2)).round_().clamp_(-self.qmax, self.qmax)
            num, den = (vg * c).sum(2), (c * c).sum(2)
            s = torch.where(den > 0, num / den.clamp_min(1), s)
        return s

    def encode_payload(self, x: torch.Tensor, observe: Observer | None = None) -> tuple[Header, Parts]:
        idx, vals = outliers(x, round(self.spec.outlier_fraction * x.numel()))
        bad = ~torch.isfinite(vals)
        if bool(bad.any()):  # the largest |x| are inf: they would be stored "exactly"
            layer = int((idx[bad][0] // x.shape[2]) % x.shape[1])
            raise ValueError(f"encode: layer {layer} holds {float(vals[bad][0])} (NaN or inf) among the outliers")
        return self.header(shape3(x.shape), idx.numel()), self._encode(x, idx, vals, observe)

    def _encode(self, x: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, observe: Observer | None) -> Parts:
        t, n_layers, d = x.shape
        spec, qmax, absmax = self.spec, self.qmax, self.spec.scale_rule == "absmax"
        # outlier positions in layer-major order: zeroed in each layer's bulk and residual
        key = (((idx // d) % n_layers) * (t * d) + (idx // (n_layers * d)) * d + idx % d).sort().values
        xs, prev, cur = torch.empty(t, d), torch.zeros(t, d), torch.empty(t, d)
        codes, beta = torch.empty(t * d, dtype=torch.int8), torch.zeros(d)
        for layer in range(n_layers):
            lo, hi = torch.searchsorted(key, torch.tensor([layer * t * d, (layer + 1) * t * d])).tolist()
            pos = key[lo:hi] - layer * t * d
            xs.copy_(x[:, layer])
            if observe:
                observe(layer, xs)  # while the layer is in cache
            xs.view(-1)[pos] = 0.0
            s = self._fit(xs) if absmax else None  # the signal's step
            if spec.predict and layer:  # closed loop: least squares on the decoded previous layer
                num, den = torch.linalg.vecdot(xs, prev, dim=0), torch.linalg.vecdot(prev, prev, dim=0)
                beta = bf16(torch.where(den > 0, num / den.clamp_min(1e-30), 0.0), up=False).float()
                xs.addcmul_(prev, beta, value=-1.0)
                xs.view(-1)[pos] = 0.0
            if s is None or (spec.predict and layer):
                s = self._fit(xs) if s is None else torch.maximum(s, self._fit(xs))
            finite = bool(torch.isfinite(s).all())  # checked first: bf16 takes a NaN's bits for a number
            if finite and spec.granularity != "layer":
                s = bf16(s, up=absmax)
                finite = bool(torch.isfinite(s).all())  # a huge finite scale can round up to inf
            if not finite:
                raise ValueError(f"encode: layer {layer} holds NaN or inf (outside the stored outliers)")
            shape, sb = self._bcast(s.float(), t, d)
            c = (xs.view(shape) / torch.where(sb > 0, sb, 1.0)).round_()
            if not absmax:  # absmax scales bound |code| by qmax already
                c.clamp_(-qmax, qmax)
            codes.view(shape).copy_(c)  # exact: c is integral and in range
            if spec.predict:  # the decoder's reconstruction, the next layer's predictor
                torch.mul(c, sb, out=cur.view(shape))
                if layer:
                    cur.addcmul_(prev, beta)
                prev, cur = cur, prev
            yield as_bytes(s.reshape(-1))
            if spec.predict:
                yield as_bytes(bf16(beta, up=False))
            yield pack(codes.numpy(), self.bits)
        yield as_bytes(torch.diff(idx, prepend=idx.new_zeros(1)).to(torch.int32))
        yield as_bytes(vals)

    def decode_payload(self, buf: memoryview, h: Header) -> torch.Tensor:
        t, n_layers, d = h.tokens, h.n_layers, h.d_model
        out, (n_scale, n_beta, n_codes), pos = empty(t, n_layers, d), self._record(h), 0
        layer_gran = self.spec.granularity == "layer"
        for layer in range(n_layers):
            raw = buf[pos : pos + n_scale]
            scales = torch.frombuffer(raw, dtype=torch.float32).view(1, 1) if layer_gran else from_bf16(raw).view(t, -1)
            beta = from_bf16(buf[pos + n_scale : pos + n_scale + n_beta]) if n_beta and layer else None
            codes = torch.from_numpy(
                unpack(buf[pos + n_scale + n_beta : pos + n_scale + n_beta + n_codes], self.bits, t * d)
            )
            pos += n_scale + n_beta + n_codes
            for a in range(0, t, BLOCK_TOKENS):
                b = min(a + BLOCK_TOKENS, t)
                shape, s = self._bcast(scales if layer_gran else scales[a:b], b - a, d)
                o = out[a:b, layer]
                torch.mul(codes[a * d : b * d].view(shape), s, out=o.view(shape))
                if beta is not None:
                    o.addcmul_(out[a:b, layer - 1], beta)
        if h.n_outliers:
            idx = torch.frombuffer(buf[pos : pos + 4 * h.n_outliers], dtype=torch.int32).long().cumsum(0)
            if int(idx.min()) < 0 or int(idx[-1]) >= out.numel():
                raise ValueError("corrupt quant blob: outlier index out of range")
            out.view(-1)[idx] = torch.frombuffer(buf[pos + 4 * h.n_outliers :], dtype=torch.float32)
        return out


@register_quantizer("int8")
class Int8Quantizer(IntQuantizer):
    code, bits = 8, 8


@register_quantizer("int4")
class Int4Quantizer(IntQuantizer):
    code, bits = 4, 4


@register_quantizer("int2")
class Int2Quantizer(IntQuantizer):
    code, bits = 2, 2
