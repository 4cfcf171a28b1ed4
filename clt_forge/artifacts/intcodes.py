"""The numeric pieces of the integer codecs (quantizers.py): bit packing of int4/int2 codes,
bfloat16 scales rounded up, outlier selection, and tensors <-> bytes without copies.

Bit order (quant.py documents the whole blob): int4/int2 pack k = 8/b codes per byte, code i in
bits [b*(i mod k), b*(i mod k)+b) of byte i//k (the first code in the low bits), each as the b low
bits of its two's complement (int4 -3 -> 0b1101, int2 -1 -> 0b11); the last byte is zero-padded.
"""

from __future__ import annotations

import numpy as np
import torch


def empty(*shape: int) -> torch.Tensor:
    return torch.from_numpy(np.empty(shape, dtype=np.float32))  # numpy maps big arrays on huge pages: 4x fewer faults


def as_bytes(t: torch.Tensor) -> memoryview:
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().data.cast("B")  # numpy: no bf16


def bf16(s: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 >= 0 -> bfloat16; `up` rounds toward +inf, so that |x| / scale <= qmax still holds."""
    if not up:
        return s.to(torch.bfloat16)
    bits = s.contiguous().view(torch.int32)
    return ((bits >> 16) + ((bits & 0xFFFF) != 0).to(torch.int32)).to(torch.int16).view(torch.bfloat16)


def from_bf16(raw: memoryview) -> torch.Tensor:
    return torch.frombuffer(raw, dtype=torch.bfloat16).float() if len(raw) else torch.empty(0)


def pack(codes: np.ndarray, bits: int) -> memoryview:
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


def _lut(bits: int) -> np.ndarray:
    """byte -> its 8/bits sign-extended codes as one little-endian word: a gather, then a view as int8."""
    k, byte, half = 8 // bits, np.arange(256), 1 << (bits - 1)
    fields = [(((byte >> (bits * j)) & ((1 << bits) - 1)) ^ half) - half for j in range(k)]
    word = np.zeros(256, dtype=np.int64)
    for j, f in enumerate(fields):
        word |= (f & 0xFF) << (8 * j)
    return word.astype(f"<u{k}")


_LUTS = {4: _lut(4), 2: _lut(2)}


def unpack(raw: memoryview, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack`: n int8 codes."""
    packed = np.frombuffer(raw, dtype=np.uint8)
    return packed.view(np.int8) if bits == 8 else np.take(_LUTS[bits], packed).view(np.int8)[:n]


def outliers(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
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
