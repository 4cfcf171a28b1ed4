"""W_dec's gradient built a few blocks at a time inside its Adam step (`optim.decoder_grad=blocks`).

The one job of this file: train W_dec without ever holding a W_dec-sized gradient. W_dec is the
CLT's largest tensor (F x L (L + 1) / 2 x D: 4.9 GB in fp32 at L=30, D=576, F=4,608), and a
training step otherwise holds it four times: the parameter, its gradient, Adam's two moments.

The decode's backward (clt_forge/clt/model.py, sparse_decode.py) hands its W_dec gradient to a
`DecoderGradSink`. This one keeps only what builds the gradient: z (or its sparse rows), the
gradient of the reconstruction [B, L, D] and the norm terms' coefficients [L, F], all small. The
gradient is then built a chunk at a time (CHUNK_ELEMENTS at most) into one reused buffer:
  - after a dense decode, a run of one source layer's (source, target) pairs for all features:
    one GEMM of F rows each, the fast shape for a dense z;
  - after a sparse decode, a run of features over all pairs: contiguous in W_dec and in its
    moments, so torch's fused Adam kernel steps each chunk in one pass (the for-loop update below
    reads and writes W_dec-sized tensors five times; ~3x slower at the issue 18 shape);
and:
  - `square` (in the backward, when clipping needs it): the sum of squares of every chunk, so
    global-norm clipping sees the exact same norm as with the full gradient;
  - `adam_step` (after the optimizer's own step): each chunk again, times the clipping factor
    `scale`, then torch's Adam update of those pairs of W_dec and its moments (same formula,
    same state entries `step` / `exp_avg` / `exp_avg_sq` in the optimizer's state, so checkpoints
    and resumes are the same as with `full`; equal to torch's Adam to fp32 rounding).
With clipping on, the norm comes from the decode's `square` (sparse_decode.decoder_grad_square:
B x B Gram matrices and the decode's own grad z, no gradient built), so each chunk is built once;
where the decode gives none (a bf16 decode), each chunk is built twice (norm, then step).
Adam still updates every row of W_dec each step, as dense Adam does: its moments move rows no
feature touched, and the dead-feature term gives nearly every row a gradient anyway.

`exp_avg_dtype=torch.bfloat16` (`optim.exp_avg_dtype=bfloat16`) keeps W_dec's first moment m in
bf16, half its fp32 size (2.47 GB at the shape above): each chunk of m is upcast into an fp32
buffer, updated with the same formula (the update uses that fp32 value) and stored back rounded to
nearest. m = beta1 m + (1 - beta1) g keeps each update in bf16's 8-bit mantissa at beta1 = 0.9;
the second moment stays fp32 (at beta2 = 0.999 an update is 0.1% of its value, below bf16's
resolution: rounding to nearest would freeze it). Checkpoints store the moments in fp32 either way
(write_tensors: bf16 values upcast exactly); a resume casts exp_avg to this dtype as it loads it
(training/resume.py, on the CPU), and `adam_step` casts a state left in the other dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

import clt_forge.clt.native as native
from clt_forge.clt.sparse_decode import decoder_block_grad
from clt_forge.errors import CLTError

if TYPE_CHECKING:
    from clt_forge.clt.model import CrossLayerTranscoder

__all__ = ["CHUNK_ELEMENTS", "DeferredDecoderGrad", "adam_state", "enable_deferred_decoder"]

CHUNK_ELEMENTS = 16 * 2**20  # the gradient buffer: 64 MiB in fp32 (one (source, target) pair if that is larger)
FUSED_DTYPES = (torch.float32, torch.float64)  # contiguous chunks of these step through torch's fused Adam


@dataclass
class _Pending:
    """What one backward left to build W_dec's gradient from."""

    W_dec: torch.Tensor  # as the decode saw it (autocast's copy under bf16)
    offsets: list[int]
    z_t: Callable[[int], torch.Tensor]
    grad_recon: torch.Tensor | None
    coef: torch.Tensor | None


class DeferredDecoderGrad:
    """The `DecoderGradSink` of `optim.decoder_grad=blocks` (see the module docstring).

    `clip`: whether the backward also computes the gradient's sum of squares (`square`), for
    global-norm clipping; the clipping then sets `scale` (1 when it does not clip).
    `exp_avg_dtype`: the dtype W_dec's Adam first moment is kept in (float32 or bfloat16).
    `native_kernel`: whether a step after a sparse decode runs the native kernel (clt.native_kernel,
    clt_forge/clt/native.py): auto (where it builds), on (stop where it does not), off (torch ops)."""

    def __init__(
        self, clip: bool = True, exp_avg_dtype: torch.dtype = torch.float32, native_kernel: str = "auto"
    ) -> None:
        self.clip = clip
        self.exp_avg_dtype = exp_avg_dtype
        self.native_kernel = native.check_mode(native_kernel)
        self.norms: tuple[int, int, torch.Tensor] | None = None  # (W_dec's version, data_ptr, its norms [L, F])
        self.pending: _Pending | None = None
        self.square: torch.Tensor | None = None
        self.scale: float | torch.Tensor = 1.0
        self._buffer: torch.Tensor | None = None
        self._moment: torch.Tensor | None = None  # bf16 exp_avg: one chunk of it in fp32

    def __getstate__(self) -> dict:  # scratch state: a copy of the CLT starts without it
        return {"clip": self.clip, "exp_avg_dtype": self.exp_avg_dtype, "native_kernel": self.native_kernel}

    def __setstate__(self, state: dict) -> None:
        self.__init__(  # type: ignore[misc]
            state["clip"], state.get("exp_avg_dtype", torch.float32), state.get("native_kernel", "auto")
        )

    def cached_norms(self, W_dec: torch.Tensor) -> torch.Tensor | None:
        """W_dec's decoder norms [L, F] as the native kernel's last step left them, while W_dec is
        unchanged since (same storage, same autograd version counter); else None."""
        if self.norms is None:
            return None
        version, pointer, norms = self.norms
        if W_dec._version != version or W_dec.data_ptr() != pointer or W_dec.dtype != norms.dtype:
            return None
        return norms.clone()

    def gradient(
        self,
        W_dec: torch.Tensor,
        offsets: list[int],
        z_t: Callable[[int], torch.Tensor],
        grad_recon: torch.Tensor | None,
        coef: torch.Tensor | None,
        square: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        """Keep what builds the gradient (the decode's backward calls this); W_dec gets no .grad."""
        if self.pending is not None:
            raise CLTError(
                "optim.decoder_grad=blocks: a second backward before the decoder's Adam step "
                "(gradient accumulation needs optim.decoder_grad=full)."
            )
        self.pending = _Pending(W_dec, offsets, z_t, grad_recon, coef)
        if self.clip and square is not None:  # from Gram matrices: no pass over the gradient
            self.square = square()
        elif self.clip:
            total = torch.zeros((), dtype=torch.float64, device=W_dec.device)
            low = W_dec.dtype in (torch.bfloat16, torch.float16)  # autocast: the full path's clip sees fp32
            for _, chunk in self._blocks():  # each chunk's norm in fp32 (as torch's clip), summed in float64
                total += torch.linalg.vector_norm(chunk, dtype=torch.float32 if low else None).double().square()
            self.square = total
        return None

    def _blocks(self) -> Iterator[tuple[tuple[slice, slice], torch.Tensor]]:
        """((feature rows, pair columns) of W_dec, their gradient [rows, pairs, D]) in the reused
        buffer, one chunk at a time: by features when the decode was sparse (`_feature_chunks`),
        else by pairs (`_pair_chunks`)."""
        pending = self.pending
        assert pending is not None
        z_t = [pending.z_t(source) for source in range(len(pending.offsets) - 1)]  # [F, B] per source, once
        sparse = z_t[0].layout == torch.sparse_csr
        return self._feature_chunks(pending, z_t) if sparse else self._pair_chunks(pending, z_t)

    def _chunk_buffer(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() != numel or self._buffer.dtype != like.dtype:
            self._buffer = like.new_empty(numel)
        return self._buffer

    def _pair_chunks(
        self, pending: _Pending, z_t: list[torch.Tensor]
    ) -> Iterator[tuple[tuple[slice, slice], torch.Tensor]]:
        """All features, a source layer's targets in runs of at most CHUNK_ELEMENTS // (F D)
        (at least one): each run one GEMM of F rows, the dense decode's fast shape."""
        W_dec, offsets = pending.W_dec, pending.offsets
        d_features, d_model = W_dec.shape[0], W_dec.shape[2]
        n_layers = len(offsets) - 1
        run = max(1, min(n_layers, CHUNK_ELEMENTS // (d_features * d_model)))
        buffer = self._chunk_buffer(run * d_features * d_model, W_dec)
        for source in range(n_layers):
            for first in range(source, n_layers, run):
                targets = range(first, min(first + run, n_layers))
                chunk = buffer[: d_features * len(targets) * d_model].view(d_features, -1)
                decoder_block_grad(
                    chunk, W_dec, offsets, source, z_t[source], pending.grad_recon, pending.coef, targets
                )
                start = offsets[source] + first - source
                yield (slice(None), slice(start, start + len(targets))), chunk.view(d_features, len(targets), d_model)

    def _feature_chunks(
        self, pending: _Pending, z_t: list[torch.Tensor]
    ) -> Iterator[tuple[tuple[slice, slice], torch.Tensor]]:
        """Runs of CHUNK_ELEMENTS // (P D) features (at least one) over all pairs: contiguous in
        W_dec and its moments, so torch's fused Adam steps each in one pass (`adam_step`). The
        same values as `_pair_chunks`: coef * W, plus each source's CSR rows of z^T (the active
        features of the run) times the gradient of that source's targets."""
        W_dec, offsets, grad_recon = pending.W_dec, pending.offsets, pending.grad_recon
        d_features, n_pairs, d_model = W_dec.shape
        n_layers = len(offsets) - 1
        rows = max(1, CHUNK_ELEMENTS // (n_pairs * d_model))
        buffer = self._chunk_buffer(min(rows, d_features) * n_pairs * d_model, W_dec)
        starts = [z.crow_indices().tolist() for z in z_t]
        coef = None
        if pending.coef is not None:  # [F, P]: each pair's row gets its source's coefficient
            sizes = torch.tensor([offsets[s + 1] - offsets[s] for s in range(n_layers)], device=W_dec.device)
            coef = pending.coef.repeat_interleave(sizes, dim=0).t()
        for first in range(0, d_features, rows):
            features = slice(first, min(first + rows, d_features))
            count = features.stop - features.start
            chunk = buffer[: count * n_pairs * d_model].view(count, n_pairs, d_model)
            if coef is not None:
                torch.mul(W_dec[features], coef[features, :, None], out=chunk)
            else:
                chunk.zero_()
            for source in range(n_layers):
                low, high = starts[source][features.start], starts[source][features.stop]
                if grad_recon is None or low == high:  # no reconstruction gradient, or no active row here
                    continue
                z = z_t[source]
                part = torch.sparse_csr_tensor(  # the rows of the run: slices of z_t's arrays
                    z.crow_indices()[features.start : features.stop + 1] - low,
                    z.col_indices()[low:high],
                    z.values()[low:high],
                    size=(count, z.shape[1]),
                    check_invariants=False,
                )
                targets = chunk[:, offsets[source] : offsets[source + 1]].flatten(1)  # [count, (L - source) D]
                targets.addmm_(part, grad_recon[:, source:].flatten(1))
            yield (features, slice(None)), chunk

    def adam_step(self, optimizer: torch.optim.Optimizer, W_dec: torch.Tensor) -> None:
        """Adam on W_dec (a parameter of `optimizer` with no .grad), chunk by chunk, with
        the gradient times `scale`; clears what the backward left. Nothing to do without one."""
        if self.pending is None:
            return
        group, state = adam_state(optimizer, W_dec, self.exp_avg_dtype, "blocks")
        if state["exp_avg"].dtype != self.exp_avg_dtype:  # resumed from a run with the other setting
            state["exp_avg"] = state["exp_avg"].to(self.exp_avg_dtype)
        low = self.exp_avg_dtype != W_dec.dtype  # bf16 exp_avg: each chunk updated in fp32 (self._moment)
        state["step"] += 1
        step = float(state["step"])
        moments = (state["exp_avg"], state["exp_avg_sq"])
        lr, (beta1, beta2), eps = float(group["lr"]), group["betas"], group["eps"]
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5  # as torch's Adam
        fused = W_dec.dtype in FUSED_DTYPES and state["step"].device == W_dec.device
        self.norms = None
        if self._native(W_dec, moments):
            pending = self.pending
            norms = native.decoder_adam(
                W_dec.detach(), *moments, pending.offsets,
                [pending.z_t(source) for source in range(len(pending.offsets) - 1)],
                pending.grad_recon, pending.coef, float(self.scale), lr, beta1, beta2, eps, step,
            )  # fmt: skip
            self.norms = (W_dec._version, W_dec.data_ptr(), norms)
            self.pending, self.square, self.scale = None, None, 1.0
            return
        with torch.no_grad():
            for where, grad in self._blocks():
                if grad.dtype != W_dec.dtype:  # bf16 autocast: the decode ran on a bf16 copy
                    grad = grad.to(W_dec.dtype)
                if not (isinstance(self.scale, float) and self.scale == 1.0):
                    grad.mul_(self.scale)
                param, stored, exp_avg_sq = (t[where] for t in (W_dec, *moments))
                exp_avg = self._upcast(stored) if low else stored
                if fused and param.is_contiguous():  # a run of features (`_feature_chunks`): one pass
                    torch._fused_adam_(
                        [param], [grad], [exp_avg], [exp_avg_sq], [], [state["step"]],
                        lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False,
                    )  # fmt: skip
                else:
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = torch.sqrt(exp_avg_sq, out=grad)  # the gradient is spent: its buffer takes the denominator
                    denom.div_(bias_correction2_sqrt).add_(eps)
                    param.addcdiv_(exp_avg, denom, value=-step_size)
                if low:
                    stored.copy_(exp_avg)  # rounded to nearest (even); the update used the fp32 value
        self.pending, self.square, self.scale = None, None, 1.0

    def _native(self, W_dec: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Whether this step runs the native kernel: after a sparse fp32 decode of W_dec itself, on
        the CPU, with contiguous moments, and `native_kernel` not off (on: stop where it cannot build)."""
        pending = self.pending
        assert pending is not None
        if not native.usable(self.native_kernel, W_dec, moments[1]):
            return False
        return (
            pending.W_dec.data_ptr() == W_dec.data_ptr()
            and pending.W_dec.dtype == W_dec.dtype
            and W_dec.is_contiguous()
            and all(m.is_contiguous() for m in moments)
            and pending.z_t(0).layout == torch.sparse_csr
        )

    def flush(self, W_dec: torch.Tensor) -> None:
        """Bring W_dec and its Adam state up to the current step before they are read: nothing to
        do here, every step updates every row (`RowLazyAdam`, `optim.decoder_grad=rows`, overrides)."""

    def _upcast(self, stored: torch.Tensor) -> torch.Tensor:
        """`stored` (a chunk of the bf16 exp_avg) in fp32, in a buffer reused across chunks."""
        if self._moment is None or self._moment.numel() < stored.numel() or self._moment.device != stored.device:
            self._moment = torch.empty(stored.numel(), dtype=torch.float32, device=stored.device)
        return self._moment[: stored.numel()].view(stored.shape).copy_(stored)


def adam_state(
    optimizer: torch.optim.Optimizer, W_dec: torch.Tensor, exp_avg_dtype: torch.dtype, mode: str
) -> tuple[dict, dict]:
    """(W_dec's param group, its Adam state), the state made as torch's Adam makes it (`step`,
    `exp_avg` in `exp_avg_dtype`, `exp_avg_sq`) on first use, for the `optim.decoder_grad=MODE`
    sinks that step W_dec themselves."""
    group = next((g for g in optimizer.param_groups if any(p is W_dec for p in g["params"])), None)
    if group is None:
        raise CLTError(f"optim.decoder_grad={mode}: W_dec is not among the optimizer's parameters.")
    if group.get("amsgrad") or group.get("weight_decay") or group.get("maximize"):
        raise CLTError(f"optim.decoder_grad={mode} implements plain Adam (no amsgrad, weight decay, maximize).")
    state = optimizer.state[W_dec]
    if not state:
        on_device = group.get("fused") or group.get("capturable")  # where torch's Adam keeps `step`
        state["step"] = torch.zeros((), dtype=torch.float32, device=W_dec.device if on_device else None)
        state["exp_avg"] = torch.zeros_like(W_dec, dtype=exp_avg_dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(W_dec, memory_format=torch.preserve_format)
    return group, state


def enable_deferred_decoder(
    clt: CrossLayerTranscoder,
    clip: bool = True,
    exp_avg_dtype: torch.dtype = torch.float32,
    native_kernel: str | None = None,
) -> DeferredDecoderGrad:
    """Route `clt`'s W_dec gradient to a new `DeferredDecoderGrad` (returned): W_dec.grad stays
    None, and `adam_step` after each optimizer step updates W_dec (its exp_avg in `exp_avg_dtype`;
    `native_kernel` as the sink's, None: the CLT's own, clt.native_kernel)."""
    sink = DeferredDecoderGrad(clip, exp_avg_dtype, clt.native_kernel if native_kernel is None else native_kernel)
    clt.decoder_grad = sink
    clt.grad_buffer = None  # no full-size gradient buffer is kept either
    return sink
