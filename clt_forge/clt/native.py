"""The sparse decode's CPU kernels (`clt.native_kernel`), compiled from sparse_kernels.c at first use.

The one job of this file: build sparse_kernels.c (next to this file) with the machine's C compiler
into clt-forge's cache folder, load it with ctypes, and run its three kernels over the threads
torch uses:
  - `sparse_decode`: the forward's sum of active decoder rows, one token's output row in cache at
    a time (torch's CSR product: 1.1-1.2x its time at issue 18's shape);
  - `sampled_grad_z`: grad z at the needed entries, one feature's decoder row in cache at a time
    (torch's sampled product on runs of rows: 2.2x its time);
  - `decoder_adam`: W_dec's Adam step after a sparse decode under optim.decoder_grad=blocks, each
    feature's gradient row built in cache and stepped at once, leaving the new decoder norms for
    the next forward (torch ops: four more passes over W_dec-sized memory, 1.5x its time).
Same formulas, same state; the results agree with the torch ops to fp32 rounding
(tests/test_native.py). The timings are one-off scratch timings at L=30, D=576, F=4,608, B=256,
1% active, 2 threads (docs/performance.md); `benchmarks/train_step.py --native off` times a step
without them.

Building: `$CC` (else `cc`) with -O3 -march=native -fno-math-errno -fopenmp-simd into
`cache_root()/native/sparse_kernels-<key>.so`, where the key hashes the source, the compiler's
version and the CPU's flags (a cache folder shared by nodes with other CPUs gets one library per
CPU kind); written under a temporary name and renamed, so ranks building at once do not collide.
Where no compiler works, `load()` returns None and `unavailable()` says why: clt.native_kernel=auto
then runs the torch ops, `on` stops with that reason (`usable`).

Threads: each of torch.get_num_threads() Python threads runs a kernel on its own range of tokens
or features (ctypes releases the GIL during the call); the library has no OpenMP runtime.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from clt_forge.errors import CLTError
from clt_forge.paths import cache_root

__all__ = ["MODES", "check_mode", "decoder_adam", "load", "sampled_grad_z", "sparse_decode", "unavailable", "usable"]

MODES = ("auto", "on", "off")  # clt.native_kernel
SOURCE = Path(__file__).with_name("sparse_kernels.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared"]
VERSION = 2  # clt_kernels_version() of the source this wrapper calls

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES: dict[str, list[Any]] = {  # as in sparse_kernels.c
    "clt_sparse_decode": [_I] * 4 + [_P] * 6,
    "clt_sampled_grad_z": [_I] * 6 + [_P] * 6,
    "clt_decoder_adam": [_I] * 5 + [_P] * 3 + [ctypes.c_int] + [_P] * 6 + [_F] * 6 + [_P] * 2,
}
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
    target = cache_root() / "native" / f"{SOURCE.stem}-{_key(compiler)}.so"
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
    """The compiled kernels (built on first use), or None where they cannot be built (`unavailable`)."""
    global _failure
    try:
        lib = ctypes.CDLL(str(_build()))
        if lib.clt_kernels_version() != VERSION:
            raise RuntimeError(f"the library's version is not {VERSION}")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _failure = f"the native kernels ({SOURCE.name}) could not be built or loaded: {exc}"
        return None
    _failure = None
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, None
    return lib


def unavailable() -> str | None:
    """Why `load()` returned None (None when it loaded)."""
    load()
    return _failure


def check_mode(mode: str) -> str:
    """`mode` when it is one of MODES, else a CLTError naming clt.native_kernel."""
    if mode not in MODES:
        raise CLTError(f"clt.native_kernel={mode!r}: use auto, on or off.")
    return mode


def usable(mode: str, *tensors: torch.Tensor) -> bool:
    """Whether clt.native_kernel=`mode` runs the kernels on `tensors`: fp32 CPU tensors, a library
    that builds, and mode auto or on (on: a CLTError with the reason where it does not build)."""
    if check_mode(mode) == "off":
        return False
    if mode == "on" and load() is None:
        raise CLTError(f"clt.native_kernel=on: {_failure}")
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and load() is not None


def _library() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise CLTError(f"clt.native_kernel: {_failure}")
    return lib


def _pointers(tensors: list[torch.Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(None if t is None else t.data_ptr() for t in tensors))


def _csr_arrays(csr: list[torch.Tensor | None], values: bool = True) -> tuple[Any, ...]:
    """(the tensors to keep alive, pointer arrays of row starts, column indices[, values]), int64 / fp32."""
    crow = [None if m is None else m.crow_indices().to(torch.int64).contiguous() for m in csr]
    col = [None if m is None else m.col_indices().to(torch.int64).contiguous() for m in csr]
    arrays = [crow, col]
    if values:
        arrays.append([None if m is None else m.values().to(torch.float32).contiguous() for m in csr])
    keep = [t for part in arrays for t in part if t is not None]
    return (keep, *(_pointers(part) for part in arrays))


def _offsets(offsets: list[int]) -> ctypes.Array:
    return (ctypes.c_int64 * len(offsets))(*offsets)


def _contiguous(name: str, tensor: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"native kernels: {name} must be a contiguous CPU tensor of shape {tuple(shape)}")


def _parallel(items: int, run: Callable[[int, int], None]) -> None:
    """run(begin, end) over torch.get_num_threads() equal ranges of range(items), one thread each."""
    threads = max(1, min(torch.get_num_threads(), items))
    bounds = [items * i // threads for i in range(threads + 1)]
    if threads == 1:
        run(0, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, bounds[:-1], bounds[1:]))


def sparse_decode(z_csr: list[torch.Tensor], W_dec: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """sum over sources l of z_csr[l] (z[:, l] as CSR [B, F]) times W_dec's source-l block, into
    the targets l..L-1: the reconstruction without bias [B, L, D]."""
    lib = _library()
    d_model = W_dec.shape[2]
    _contiguous("W_dec", W_dec, W_dec.shape)
    if W_dec.dtype != torch.float32:
        raise ValueError("native kernels: W_dec must be float32")
    batch, n_layers = z_csr[0].shape[0], len(offsets) - 1
    out = W_dec.new_zeros(batch, n_layers, d_model)
    _keep, crow, col, val = _csr_arrays(list(z_csr))
    offset_array = _offsets(offsets)
    _parallel(
        batch,
        lambda begin, end: lib.clt_sparse_decode(
            begin, end, n_layers, d_model, offset_array, W_dec.data_ptr(), crow, col, val, out.data_ptr()
        ),
    )
    return out


def sampled_grad_z(
    patterns: list[torch.Tensor | None],
    W_dec: torch.Tensor,
    offsets: list[int],
    grad_recon: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out[l, t, f] = <W_dec[f, source l's block], grad_recon[t, l:]> at the entries of
    patterns[l] (CSR [F, B]; its values ignored) for every l with a pattern; other entries of `out`
    [L, B, F] are left as they are."""
    lib = _library()
    d_features, _, d_model = W_dec.shape
    n_layers = len(offsets) - 1
    batch = out.shape[1]
    _contiguous("W_dec", W_dec, W_dec.shape)
    _contiguous("grad_recon", grad_recon, (batch, n_layers, d_model))
    _contiguous("grad_z", out, (n_layers, batch, d_features))
    if not W_dec.dtype == grad_recon.dtype == out.dtype == torch.float32:
        raise ValueError("native kernels: W_dec, grad_recon and grad_z must be float32")
    _keep, crow, col = _csr_arrays(patterns, values=False)
    offset_array = _offsets(offsets)

    def run(begin: int, end: int) -> None:
        lib.clt_sampled_grad_z(
            begin, end, d_features, batch, n_layers, d_model, offset_array, W_dec.data_ptr(), crow, col,
            grad_recon.data_ptr(), out.data_ptr(),
        )  # fmt: skip

    _parallel(d_features, run)


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
    lib = _library()
    d_features, _, d_model = W_dec.shape
    n_layers = len(offsets) - 1
    for name, tensor in (("W_dec", W_dec), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _contiguous(name, tensor, W_dec.shape)
    if W_dec.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise ValueError("native kernels: W_dec and exp_avg_sq must be float32")
    if exp_avg.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"native kernels: exp_avg is {exp_avg.dtype}, not float32 or bfloat16")
    _keep, crow, col, val = _csr_arrays(list(z_t))
    recon = None if grad_recon is None else grad_recon.to(torch.float32).contiguous()
    coefficients = None if coef is None else coef.to(torch.float32).contiguous()
    norms = W_dec.new_empty(n_layers, d_features)
    offset_array = _offsets(offsets)

    def run(begin: int, end: int) -> None:
        scratch = W_dec.new_empty(n_layers * d_model)  # this thread's gradient row
        lib.clt_decoder_adam(
            begin, end, d_features, n_layers, d_model, offset_array,
            W_dec.data_ptr(), exp_avg.data_ptr(), int(exp_avg.dtype == torch.bfloat16), exp_avg_sq.data_ptr(),
            None if coefficients is None else coefficients.data_ptr(), crow, col, val,
            None if recon is None else recon.data_ptr(),
            scale, beta1, beta2, lr / (1 - beta1**step), (1 - beta2**step) ** 0.5, eps,
            norms.data_ptr(), scratch.data_ptr(),
        )  # fmt: skip

    _parallel(d_features, run)
    for tensor in (W_dec, exp_avg, exp_avg_sq):  # written through pointers: autograd's version counters
        torch.autograd.graph.increment_version(tensor)
    return norms
