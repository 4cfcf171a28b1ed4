"""Activation codecs: one float32 [tokens, n_layers, d_model] tensor <-> one self-contained blob.

Schemes: `none` (raw float32/float16/bfloat16) and `int8`/`int4`/`int2`: symmetric codes in
[-qmax, qmax], qmax = 2^(b-1)-1 (127, 7, 1), round to nearest (half to even), value = code * scale.
Granularity: `layer` (one float32 absmax scale per layer per chunk: the paper's baseline, exactly),
`row` (one per token per layer), `group` (one per `group_size` channels per token per layer; a
row's last group is short when group_size does not divide d_model).

Beyond the paper, each chosen by measurement (benchmarks/quant_codecs.py, real SmolLM2 activations):
- outliers: the round(outlier_fraction * n) largest |x| of the chunk (one global threshold: summed
  squared error is dominated by the largest values) are stored exactly and zeroed in the bulk the
  scales see: MLP outputs hold ~25,000-size values that would set whole int4/int2 steps.
- predict=True: closed-loop cross-layer prediction (DPCM): layer l codes r = x_l - beta * xhat_{l-1},
  beta per channel by least squares on the decoded previous layer, which the decoder has too. MLP
  inputs are the normed residual stream (70-95% of a layer's energy is predictable): int8 codes
  1.0 bit/value shorter at the same error; with scale_rule=mse, int4/int2 errors 4-5x lower.
- scale_rule="absmax" (the paper): scale = absmax / qmax of the signal (with predict: the larger of
  the signal's and the residual's), so |err| <= scale / 2 and predict only saves bytes.
  scale_rule="mse" (row/group): absmax / qmax of what is coded, then 2 Lloyd steps s = <v,c>/<c,c>
  toward the least-squares step (absmax int2 rounds all under absmax/2 to zero: nMSE ~0.3).
- row/group scales are bfloat16: float32's range (float16 overflows at 65504 and flushes tiny
  groups), rounded up for absmax so no code clips; the 8-bit mantissa costs ~0.8% MSE (at most 1.6%).
- zstd runs with min_match 7 and small tables: the short matches it finds in noise-like codes
  cost more than they save (smaller and 2-3x faster).

Blob: a zstd frame (content size and checksum set) of the payload, or the payload when zstd_level=0.
Every multi-byte field is little-endian. Payload: a 32-byte header, struct "<4sBBBBIIIIQ":
  0 magic b"CLTQ" | 4 version u8 = 1 | 5 scheme u8 (none 0, int8 8, int4 4, int2 2)
  6 granularity u8 (layer 0, row 1, group 2; scheme none: dtype float32 0, float16 1, bfloat16 2)
  7 flags u8 (bit 0 predict, bit 1 scale_rule mse) | 8 group_size u32 | 12 tokens u32
  16 n_layers u32 | 20 d_model u32 | 24 n_outliers u64
scheme none: then tokens*n_layers*d_model values of the dtype, [tokens, n_layers, d_model] order.
int schemes: then per layer l = 0..n_layers-1 a record (T = tokens, D = d_model, G = ceil(D / group_size)):
  scales: float32 [1] (layer) | bfloat16 [T] (row) | bfloat16 [T, G] (group)
  beta:   bfloat16 [D], only when predict (zeros for layer 0); decoding adds beta * xhat_{l-1}
  codes:  [T, D] row-major; int8 one byte each; int4/int2 k = 8/b per byte, value i in bits
          [b*(i mod k), b*(i mod k)+b) of byte i//k (the first value in the low bits) as the b low
          bits of its two's complement (int4 -3 -> 0b1101, int2 -1 -> 0b11); last byte zero-padded
then outliers: int32 [n_outliers] flat indices into [tokens, n_layers, d_model], ascending, as deltas
(the first is the index itself; zstd packs deltas 6x better), then float32 [n_outliers] values.
"""

from __future__ import annotations

import math
import struct
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import zstandard

MAGIC, VERSION, ZSTD_MAGIC = b"CLTQ", 1, b"\x28\xb5\x2f\xfd"
HEADER = struct.Struct("<4sBBBBIIIIQ")
GRANULARITIES = {"layer": 0, "row": 1, "group": 2}
DTYPES = {"float32": (0, torch.float32), "float16": (1, torch.float16), "bfloat16": (2, torch.bfloat16)}
MSE_ITERS = 2  # Lloyd steps for scale_rule="mse" (each one shrinks the step: less error, more bytes)
BLOCK_TOKENS = 128  # decode in token blocks that stay in cache between the multiply and the add
Parts = Iterator[bytes | memoryview]
Observer = Callable[[int, torch.Tensor], None]  # (layer, its [tokens, d_model] values), e.g. statistics


@dataclass(frozen=True)
class QuantSpec:
    scheme: str  # "none" | "int8" | "int4" | "int2" (any registered name)
    granularity: str = "row"  # "layer" | "row" | "group"
    group_size: int = 64
    outlier_fraction: float = 0.0
    dtype: str = "float16"  # storage dtype when scheme == "none": float32 | float16 | bfloat16
    zstd_level: int = 1  # 0: no compression
    zstd_threads: int = 0  # 0: single-threaded, -1: all cores
    predict: bool = False  # cross-layer prediction (module docstring)
    scale_rule: str = "absmax"  # "absmax" | "mse" (row/group only)

    def __post_init__(self) -> None:
        for ok, field, expected in (
            (self.scheme in QUANTIZERS, "scheme", f"one of {sorted(QUANTIZERS)}"),
            (self.granularity in GRANULARITIES, "granularity", f"one of {list(GRANULARITIES)}"),
            (isinstance(self.group_size, int) and self.group_size >= 1, "group_size", "an int >= 1"),
            (0.0 <= self.outlier_fraction < 1.0, "outlier_fraction", "0 <= fraction < 1"),
            (self.dtype in DTYPES, "dtype", f"one of {list(DTYPES)}"),
            (-7 <= self.zstd_level <= 22, "zstd_level", "0 (off) or a zstd level in -7..22"),
            (self.scale_rule in ("absmax", "mse"), "scale_rule", "'absmax' or 'mse'"),
            (
                self.scale_rule == "absmax" or self.granularity != "layer",
                "scale_rule",
                "'absmax' with granularity='layer'",
            ),
        ):
            if not ok:
                raise ValueError(f"QuantSpec.{field}={getattr(self, field)!r}: expected {expected}")


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

    @abstractmethod
    def header(self, shape: tuple[int, int, int], n_outliers: int) -> Header: ...  # what a blob of this spec holds

    @abstractmethod
    def payload_size(self, h: Header) -> int: ...  # bytes after the header

    @abstractmethod
    def encode_payload(self, x: torch.Tensor, observe: Observer | None = None) -> tuple[Header, Parts]:
        """The header and the payload's parts; `observe` sees each layer's values once, as they are read."""

    @abstractmethod
    def decode_payload(self, buf: memoryview, h: Header) -> torch.Tensor: ...


QUANTIZERS: dict[str, type[Quantizer]] = {}


def register_quantizer(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    def add(cls: type[Quantizer]) -> type[Quantizer]:
        if name in QUANTIZERS or any(q.code == cls.code for q in QUANTIZERS.values()):
            raise ValueError(f"quantizer {name!r} (code {cls.code}) is already registered")
        cls.name = name
        QUANTIZERS[name] = cls
        return cls

    return add


def _empty(*shape: int) -> torch.Tensor:
    return torch.from_numpy(np.empty(shape, dtype=np.float32))  # numpy maps big arrays on huge pages: 4x fewer faults


def _bytes(t: torch.Tensor) -> memoryview:
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().data.cast("B")  # numpy: no bf16


def _bf16(s: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 >= 0 -> bfloat16; `up` rounds toward +inf, so that |x| / scale <= qmax still holds."""
    if not up:
        return s.to(torch.bfloat16)
    bits = s.contiguous().view(torch.int32)
    return ((bits >> 16) + ((bits & 0xFFFF) != 0).to(torch.int32)).to(torch.int16).view(torch.bfloat16)


def _from_bf16(raw: memoryview) -> torch.Tensor:
    return torch.frombuffer(raw, dtype=torch.bfloat16).float() if len(raw) else torch.empty(0)


@register_quantizer("none")
class RawQuantizer(Quantizer):
    code = 0

    def header(self, shape: tuple[int, int, int], n_outliers: int) -> Header:
        return Header(self.code, DTYPES[self.spec.dtype][0], 0, 0, *shape, 0)

    def payload_size(self, h: Header) -> int:
        return h.tokens * h.n_layers * h.d_model * DTYPES[self.spec.dtype][1].itemsize

    def encode_payload(self, x: torch.Tensor, observe: Observer | None = None) -> tuple[Header, Parts]:
        if observe:
            for layer in range(x.shape[1]):
                observe(layer, x[:, layer])
        return self.header(_shape3(x.shape), 0), iter([_bytes(x.to(DTYPES[self.spec.dtype][1]))])

    def decode_payload(self, buf: memoryview, h: Header) -> torch.Tensor:
        out = _empty(h.tokens, h.n_layers, h.d_model)
        if len(buf):
            out.view(-1).copy_(torch.frombuffer(buf, dtype=DTYPES[self.spec.dtype][1]))
        return out


class IntQuantizer(Quantizer):
    """Symmetric b-bit codes with scales, optional outliers and prediction; subclasses set `code` and `bits`."""

    bits: ClassVar[int]

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
        idx, vals = _outliers(x, round(self.spec.outlier_fraction * x.numel()))
        return self.header(_shape3(x.shape), idx.numel()), self._encode(x, idx, vals, observe)

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
                beta = _bf16(torch.where(den > 0, num / den.clamp_min(1e-30), 0.0), up=False).float()
                xs.addcmul_(prev, beta, value=-1.0)
                xs.view(-1)[pos] = 0.0
            if s is None or (spec.predict and layer):
                s = self._fit(xs) if s is None else torch.maximum(s, self._fit(xs))
            finite = bool(torch.isfinite(s).all())  # checked first: _bf16 takes a NaN's bits for a number
            if finite and spec.granularity != "layer":
                s = _bf16(s, up=absmax)
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
            yield _bytes(s.reshape(-1))
            if spec.predict:
                yield _bytes(_bf16(beta, up=False))
            yield _pack(codes.numpy(), self.bits)
        yield _bytes(torch.diff(idx, prepend=idx.new_zeros(1)).to(torch.int32))
        yield _bytes(vals)

    def decode_payload(self, buf: memoryview, h: Header) -> torch.Tensor:
        t, n_layers, d = h.tokens, h.n_layers, h.d_model
        out, (n_scale, n_beta, n_codes), pos = _empty(t, n_layers, d), self._record(h), 0
        layer_gran = self.spec.granularity == "layer"
        for layer in range(n_layers):
            raw = buf[pos : pos + n_scale]
            scales = (
                torch.frombuffer(raw, dtype=torch.float32).view(1, 1) if layer_gran else _from_bf16(raw).view(t, -1)
            )
            beta = _from_bf16(buf[pos + n_scale : pos + n_scale + n_beta]) if n_beta and layer else None
            codes = torch.from_numpy(
                _unpack(buf[pos + n_scale + n_beta : pos + n_scale + n_beta + n_codes], self.bits, t * d)
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


def _pack(codes: np.ndarray, bits: int) -> memoryview:
    """int8 codes -> bytes, 8/bits per byte, the first code in the low bits, the last byte zero-padded."""
    if bits == 8:
        return codes.view(np.uint8).data
    k = 8 // bits
    u = np.zeros(-(-codes.size // k) * k, dtype=np.uint8)
    u[: codes.size] = codes.view(np.uint8) & ((1 << bits) - 1)
    rows = u.reshape(-1, k)
    packed = rows[:, 0].copy()
    for j in range(1, k):
        packed |= rows[:, j] << (bits * j)
    return packed.data


def _shape3(shape: torch.Size) -> tuple[int, int, int]:
    tokens, n_layers, d_model = shape
    return tokens, n_layers, d_model


def _lut(bits: int) -> np.ndarray:
    """byte -> its 8/bits sign-extended codes as one little-endian word: a gather, then a view as int8."""
    k, byte, half = 8 // bits, np.arange(256), 1 << (bits - 1)
    fields = [(((byte >> (bits * j)) & ((1 << bits) - 1)) ^ half) - half for j in range(k)]
    word = np.zeros(256, dtype=np.int64)
    for j, f in enumerate(fields):
        word |= (f & 0xFF) << (8 * j)
    return word.astype(f"<u{k}")


_LUTS = {4: _lut(4), 2: _lut(2)}


def _unpack(raw: memoryview, bits: int, n: int) -> np.ndarray:
    packed = np.frombuffer(raw, dtype=np.uint8)
    return packed.view(np.int8) if bits == 8 else np.take(_LUTS[bits], packed).view(np.int8)[:n]


def _outliers(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest |x|: flat indices (ascending) and values. Exact: a threshold from a strided
    sample picks candidates in one cheap pass (a topk over 1e8 values takes seconds)."""
    flat = x.view(-1)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64), torch.empty(0)
    stride = max(1, flat.numel() // (1 << 18))
    sample = flat[::stride].abs()
    ks = min(sample.numel(), 2 * (k // stride) + 64)  # margin: the sample's quantile is noisy
    tau = float(sample.topk(ks).values[-1]) if ks < sample.numel() else -1.0
    xn, step = flat.numpy(), 1 << 18  # numpy's flatnonzero is 3x faster than torch.nonzero here
    cand = torch.from_numpy(
        np.concatenate([np.flatnonzero(np.abs(xn[a : a + step]) > tau) + a for a in range(0, xn.size, step)])
    )
    if cand.numel() < k:  # the sample missed some: exact fallback
        cand = torch.arange(flat.numel())
    idx = cand[flat[cand].abs().topk(k).indices].sort().values
    return idx, flat[idx].clone()


def _quantizer(spec: QuantSpec, shape: tuple[int, ...]) -> Quantizer:
    if sys.byteorder != "little":
        raise NotImplementedError(
            "clt_forge.artifacts.quant reads and writes its little-endian blobs on little-endian hosts only"
        )
    if len(shape) != 3 or min(shape) < 1 or math.prod(shape) >= 2**31:
        raise ValueError(f"shape {tuple(shape)}: expected [tokens, n_layers, d_model], each >= 1, < 2^31 values in all")
    return QUANTIZERS[spec.scheme](spec)


def _zstd_params(level: int, threads: int) -> zstandard.ZstdCompressionParameters:
    base = zstandard.ZstdCompressionParameters.from_level(level)
    return zstandard.ZstdCompressionParameters.from_level(
        level,
        min_match=7,
        hash_log=min(base.hash_log, 12),
        chain_log=min(base.chain_log, 12),
        search_log=min(base.search_log, 1),
        threads=threads,
        write_checksum=True,
    )


def encode(x: torch.Tensor, spec: QuantSpec, observe: Observer | None = None) -> bytes:
    """x: float32 [tokens, n_layers, d_model], contiguous, on the CPU -> one self-contained blob.

    observe(layer, values) is called once per layer with its [tokens, d_model] values while the
    encoder has them in cache: statistics computed there cost no extra pass over x."""
    q = _quantizer(spec, tuple(x.shape))
    if x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu":
        raise ValueError(f"encode expects a contiguous float32 CPU tensor, got {x.dtype} on {x.device}")
    header, parts = q.encode_payload(x, observe)
    head = header.pack()
    if spec.zstd_level == 0:
        return b"".join([head, *(bytes(p) for p in parts)])
    cctx = zstandard.ZstdCompressor(compression_params=_zstd_params(spec.zstd_level, spec.zstd_threads))
    cobj = cctx.compressobj(size=len(head) + q.payload_size(header))  # parts are compressed as they come
    return b"".join([cobj.compress(head), *(cobj.compress(p) for p in parts), cobj.flush()])


def _decompress(blob: bytes) -> np.ndarray:
    try:
        size = zstandard.frame_content_size(blob)
        if size < 0:
            raise ValueError("corrupt quant blob: a zstd frame without its content size")
        out, n = np.empty(size, dtype=np.uint8), 0  # writable (torch.frombuffer), on huge pages
        with zstandard.ZstdDecompressor().stream_reader(blob) as reader:
            while n < size and (got := reader.readinto(out.data[n:])):
                n += got
            if n < size or reader.read(1):  # reading past the end checks the frame checksum
                raise ValueError(f"truncated or corrupt zstd frame: {n} of {size} bytes decompressed")
    except zstandard.ZstdError as e:
        raise ValueError(f"corrupt or truncated zstd frame ({len(blob)} bytes): {e}") from None
    return out


def decode(blob: bytes, spec: QuantSpec, shape: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of `encode`: float32 [tokens, n_layers, d_model]. A damaged blob raises ValueError."""
    q = _quantizer(spec, tuple(shape))
    buf = _decompress(blob) if blob[:4] == ZSTD_MAGIC else np.frombuffer(bytearray(blob), dtype=np.uint8)
    if len(buf) < HEADER.size or bytes(buf[:4]) != MAGIC:
        raise ValueError(f"not a clt_forge quant blob: starts with {bytes(buf[:4])!r}, not {MAGIC!r} or a zstd frame")
    if buf[4] != VERSION:
        raise ValueError(f"quant blob version {buf[4]}; this code reads version {VERSION}")
    h = Header(*HEADER.unpack_from(buf.data)[2:])
    want = q.header(shape, h.n_outliers)  # flags bit 1 (mse) and an unused group_size do not matter
    want = want._replace(
        flags=want.flags & 1 | h.flags & 2, group_size=want.group_size if want.granularity == 2 else h.group_size
    )
    for field, got, expected in zip(Header._fields, h, want, strict=True):
        if got != expected:
            raise ValueError(
                f"quant blob has {field}={got}, but spec and shape give {expected} ({spec}, shape {tuple(shape)})"
            )
    if len(buf) != HEADER.size + q.payload_size(h):
        raise ValueError(
            f"quant blob is {len(buf)} bytes, its header implies {HEADER.size + q.payload_size(h)} (truncated or corrupt)"
        )
    return q.decode_payload(buf.data[HEADER.size :], h)


def nmse(x: torch.Tensor, y: torch.Tensor) -> float:
    """Sum of squared errors over sum of squares, in float64 (0 if both are all zero)."""
    x64 = x.double()
    err, ref = float(((x64 - y.double()) ** 2).sum()), float((x64**2).sum())
    return err / ref if ref else (math.inf if err else 0.0)
