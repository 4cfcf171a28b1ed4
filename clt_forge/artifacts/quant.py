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

Modules: quant_spec.py (QuantSpec, the settings), quantizers.py (one registered class per scheme),
intcodes.py (bit packing, bf16 scales, outliers); this module frames the blob (header, zstd).

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
import sys

import numpy as np
import torch
import zstandard

from clt_forge.artifacts.quant_spec import QuantSpec, ScaleGranularity, ScaleRule
from clt_forge.artifacts.quantizers import (
    HEADER,
    MAGIC,
    QUANTIZERS,
    VERSION,
    Header,
    IntQuantizer,
    Observer,
    Quantizer,
    RawQuantizer,
    register_quantizer,
)

__all__ = [
    "QUANTIZERS",
    "Header",
    "IntQuantizer",
    "Observer",
    "QuantSpec",
    "Quantizer",
    "RawQuantizer",
    "ScaleGranularity",
    "ScaleRule",
    "decode",
    "encode",
    "nmse",
    "register_quantizer",
]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _quantizer(spec: QuantSpec, shape: tuple[int, ...]) -> Quantizer:
    if sys.byteorder != "little":
        raise NotImplementedError(
            "clt_forge.artifacts.quant reads and writes its little-endian blobs on little-endian hosts only"
        )
    if len(shape) != 3 or min(shape) < 1 or math.prod(shape) >= 2**31:
        raise ValueError(f"shape {tuple(shape)}: expected [tokens, n_layers, d_model], each >= 1, < 2^31 values in all")
    quantizer = QUANTIZERS.lookup(spec.scheme)
    quantizer.check(spec)
    return quantizer(spec)


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
