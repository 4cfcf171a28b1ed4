"""The CPU kernel of W_dec's Adam step after a sparse decode (`optim.native_kernel`), built at first use.

The one job of this file: compile decoder_adam.c (next to this file) with the machine's C compiler
into clt-forge's cache folder, load it with ctypes, and run it on W_dec and its Adam state over
the threads torch uses. The kernel builds each feature's gradient row in a cache-resident buffer
and steps it at once (see the C file), so a step reads and writes W_dec and its two moments once;
the torch-ops path (clt_forge/clt/deferred.py) builds a W_dec-sized gradient a chunk at a time
and steps it with torch's fused Adam, four more passes over W_dec-sized memory. Same formula,
same state; the results agree to fp32 rounding (tests/test_native.py).

Building: `$CC` (else `cc`) with -O3 -march=native -fno-math-errno -fopenmp-simd into
`cache_root()/native/decoder_adam-<key>.so`, where the key hashes the source, the compiler's
version and the CPU's flags (a cache folder shared by nodes with other CPUs builds one library per
CPU kind); written to a temporary name and renamed, so ranks building at once do not collide.
Where no compiler works, `load()` returns None and says why (`unavailable()`):
`optim.native_kernel=auto` then uses the torch ops, `on` stops with that reason.

Threads: each of torch.get_num_threads() Python threads runs the kernel on its own range of
features (ctypes releases the GIL during the call); there is no OpenMP runtime in the library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from clt_forge.paths import cache_root

__all__ = ["decoder_adam", "load", "unavailable"]

SOURCE = Path(__file__).with_name("decoder_adam.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared"]
VERSION = 1  # clt_decoder_adam_version() of the source this wrapper calls

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
_ARGTYPES: list[Any] = [_I] * 5 + [_P] * 3 + [ctypes.c_int] + [_P] * 6 + [_F] * 6 + [_P] * 2  # decoder_adam.c
_failure: str | None = None


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _key(compiler: list[str]) -> str:
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), _cpu_flags().encode(), " ".join(FLAGS).encode()):
        digest.update(part)
    return digest.hexdigest()[:16]


def _build() -> Path:
    compiler = _compiler()
    target = cache_root() / "native" / f"decoder_adam-{_key(compiler)}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [*compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed on {SOURCE}: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where it cannot be built (`unavailable`)."""
    global _failure
    try:
        lib = ctypes.CDLL(str(_build()))
        if lib.clt_decoder_adam_version() != VERSION:
            raise RuntimeError(f"the library's version is not {VERSION}")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _failure = f"the native kernel ({SOURCE.name}) could not be built or loaded: {exc}"
        return None
    lib.clt_decoder_adam.argtypes = _ARGTYPES
    lib.clt_decoder_adam.restype = None
    return lib


def unavailable() -> str | None:
    """Why `load()` returned None (None when it loaded)."""
    load()
    return _failure


def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def decoder_adam(
    W_dec: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    offsets: list[int],
    z_t: list[torch.Tensor],
    grad_recon: torch.Tensor | None,
    coef: torch.Tensor | None,
    scale: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
) -> torch.Tensor:
    """Adam on W_dec [F, P, D] (fp32, contiguous, CPU) and its moments (exp_avg fp32 or bf16), in
    place, with the gradient coef * W_dec plus, per source l, z_t[l] (z[:, l]^T as CSR [F, B])
    times grad_recon[:, l:], times `scale`; `step` is the step count after this step. Returns the
    new decoder norms [L, F] (`decoder_norms_packed` of the updated W_dec)."""
    lib = load()
    if lib is None:
        raise RuntimeError(_failure)
    d_features, _, d_model = W_dec.shape
    n_layers = len(offsets) - 1
    for name, tensor in (("W_dec", W_dec), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.shape != W_dec.shape:
            raise ValueError(f"native decoder Adam: {name} must be a contiguous CPU tensor shaped like W_dec")
    if W_dec.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise ValueError("native decoder Adam: W_dec and exp_avg_sq must be float32")
    if exp_avg.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"native decoder Adam: exp_avg is {exp_avg.dtype}, not float32 or bfloat16")
    crow = [z.crow_indices().to(torch.int64).contiguous() for z in z_t]
    col = [z.col_indices().to(torch.int64).contiguous() for z in z_t]
    val = [z.values().to(torch.float32).contiguous() for z in z_t]
    recon = None if grad_recon is None else grad_recon.to(torch.float32).contiguous()
    coefficients = None if coef is None else coef.to(torch.float32).contiguous()
    norms = W_dec.new_empty(n_layers, d_features)
    offset_array = (ctypes.c_int64 * len(offsets))(*offsets)
    arrays = (_pointers(crow), _pointers(col), _pointers(val))
    threads = max(1, min(torch.get_num_threads(), d_features))
    scratch = W_dec.new_empty(threads, n_layers * d_model)
    bounds = [d_features * i // threads for i in range(threads + 1)]

    def run(part: int) -> None:
        lib.clt_decoder_adam(
            bounds[part], bounds[part + 1], d_features, n_layers, d_model, offset_array,
            W_dec.data_ptr(), exp_avg.data_ptr(), int(exp_avg.dtype == torch.bfloat16), exp_avg_sq.data_ptr(),
            None if coefficients is None else coefficients.data_ptr(), *arrays,
            None if recon is None else recon.data_ptr(),
            scale, beta1, beta2, lr / (1 - beta1**step), (1 - beta2**step) ** 0.5, eps,
            norms.data_ptr(), scratch[part].data_ptr(),
        )  # fmt: skip

    if threads == 1:
        run(0)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, range(threads)))
    for tensor in (W_dec, exp_avg, exp_avg_sq):  # written through pointers: autograd's version counters
        torch.autograd.graph.increment_version(tensor)
    return norms
