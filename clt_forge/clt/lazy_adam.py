"""Adam on W_dec at the cost of the rows a step touches (`optim.decoder_grad=rows`).

The one job of this file: step only the rows of W_dec (one per source layer and feature: its
decoders to every target, [(L - l) D]) that get a gradient, and bring every other row up to date
only when something reads it, so a training step costs no dense pass over W_dec and its two Adam
moments. On a TopK CLT without the dead-feature term (1% active), a batch of 256 tokens touches
~27% of the rows (benchmarks/active_rows.py; docs/performance.md, "Sparse decode").

A row that gets no gradient at step t still moves under dense Adam, because of its momentum:
    m_t = beta1^k m_s,  v_t = beta2^k v_s                     (k = t - s steps since its last gradient, s)
    w_t = w_{t-1} - lr_t / bc1_t * m_t / (sqrt(v_t) / sqrt(bc2_t) + eps)
Without eps, that update is g_t r^k m_s / sqrt(v_s), with g_t = lr_t sqrt(bc2_t) / bc1_t and
r = beta1 / sqrt(beta2): one scalar per step times a fixed row vector. So each untouched row only
accumulates `drift` = sum_t g_t r^(t - s) (one float64 per row, an [L, F] operation per step),
and `catch_up` applies all its skipped steps at once: w -= drift * m_s / (sqrt(v_s) + shift),
m *= beta1^k, v *= beta2^k. The moments are then exactly dense Adam's. With eps, step t's update
is g_t r^k m_s / (sqrt(v_s) + eps / b_t), b_t = beta2^(k/2) / sqrt(bc2_t); no closed form sums
that over t, so `shift` is eps times the drift-weighted mean of 1 / b_t (`drift_eps` / `drift`,
a second float64 per row). The weights are exact where eps is negligible against sqrt(v) and
off by second order in the spread of b_t over the skipped steps where it is not (which only
matters where a gradient entry was ~1e-7 or less): fp32 rounding in tests/test_lazy_adam.py,
where the same formula without `shift` was off by up to 8e-5 at lr 1e-2.

A row is caught up before it is read, so every step computes what dense Adam would:
  - before the decode (`before_decode`): the rows of features active in the batch or inside the
    JumpReLU threshold's STE window (the sparsity term's threshold gradient reads their decoder
    norms), or every row when the dead-feature term is on (it reads every norm; then every row
    also gets a gradient, and this mode saves nothing over `full`);
  - in `adam_step`: the touched rows (again, a no-op after `before_decode`), then their Adam step;
  - `flush`, before anything else reads W_dec or the optimizer state (held-out evaluation,
    checkpoints: the runner calls it), brings every row up to the current step, so checkpoints
    and resumes are those of dense Adam.
The gradient of the touched rows is kept from the backward to the step (for global-norm clipping,
as `blocks` does): at most W_dec's size, the touched share of it in practice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from clt_forge.clt.deferred import DeferredDecoderGrad, adam_state
from clt_forge.clt.sparse_decode import source_block
from clt_forge.errors import CLTError

if TYPE_CHECKING:
    from clt_forge.clt.model import CrossLayerTranscoder

__all__ = ["RowLazyAdam", "enable_row_lazy_adam"]


class RowLazyAdam(DeferredDecoderGrad):
    """The `DecoderGradSink` of `optim.decoder_grad=rows` (see the module docstring). `bind` gives it
    the optimizer; `reads_all_rows`: the loss reads every decoder norm (the dead-feature term)."""

    def __init__(self, clip: bool = True, reads_all_rows: bool = False) -> None:
        super().__init__(clip)
        self.reads_all_rows = reads_all_rows
        self.optimizer: torch.optim.Optimizer | None = None
        self.offsets: list[int] = []  # W_dec's pair offsets (the CLT's)
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # per source: (touched features, their gradient)
        self.row_step: torch.Tensor | None = None  # [L, F] the step each row is up to date with
        self.drift: torch.Tensor | None = None  # [L, F] float64: sum of g_t r^(t - row_step) since then
        self.drift_eps: torch.Tensor | None = None  # [L, F] float64: the same terms over b_t (eps's weight)
        self._views: dict[tuple[int, int], tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        self._store: torch.Tensor | None = None  # the touched rows' gradients, reused across steps

    def __getstate__(self) -> dict:
        return {"clip": self.clip, "reads_all_rows": self.reads_all_rows}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["clip"], state["reads_all_rows"])  # type: ignore[misc]

    def bind(self, optimizer: torch.optim.Optimizer, offsets: list[int]) -> None:
        self.optimizer, self.offsets = optimizer, offsets

    # -- the backward's side: the touched rows and their gradient ----------------------------------
    def gradient(
        self,
        W_dec: torch.Tensor,
        offsets: list[int],
        z_t: Callable[[int], torch.Tensor],
        grad_recon: torch.Tensor | None,
        coef: torch.Tensor | None,
        square: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        if self.rows:
            raise CLTError("optim.decoder_grad=rows: a second backward before the decoder's Adam step.")
        total = torch.zeros((), dtype=torch.float64, device=W_dec.device)  # the built rows' norms: `square` unused
        used = 0
        for source in range(len(offsets) - 1):
            z_source_t = z_t(source)
            sparse = z_source_t.layout != torch.strided  # the sparse decode: keep the product sparse
            if sparse:
                z_source_t = z_source_t.to_dense()
            touched = z_source_t.ne(0).any(dim=1)
            if coef is not None:
                touched |= coef[source].ne(0)
            index = touched.nonzero().squeeze(1)
            block = source_block(W_dec, offsets, source)
            grad = self._take(W_dec, used, len(index), block.shape[1])
            used += grad.numel()
            if coef is not None:
                torch.mul(block.index_select(0, index), coef[source, index, None], out=grad)
            else:
                grad.zero_()
            if grad_recon is not None:
                z_rows = z_source_t.index_select(0, index)
                grad.addmm_(z_rows.to_sparse_csr() if sparse else z_rows, grad_recon[:, source:].flatten(1))
            if self.clip:
                total += torch.linalg.vector_norm(grad, dtype=torch.float32).double().square()
            self.rows.append((index, grad))
        self.square = total if self.clip else None
        return None

    def _take(self, W_dec: torch.Tensor, start: int, n_rows: int, width: int) -> torch.Tensor:
        """[n_rows, width] of the reused gradient store from `start` (grown when needed: W_dec's
        size at most, when every row is touched)."""
        end = start + n_rows * width
        if self._store is None or self._store.numel() < end or self._store.dtype != W_dec.dtype:
            # rows already written this backward keep their views of the old store alive
            self._store = W_dec.new_empty(min(W_dec.numel(), 2 * end))
        return self._store[start:end].view(n_rows, width)

    # -- the optimizer's side -------------------------------------------------------------------
    def _state(self, W_dec: torch.Tensor) -> tuple[dict, dict]:
        if self.optimizer is None:
            raise CLTError("optim.decoder_grad=rows: the sink has no optimizer (call bind).")
        group, state = adam_state(self.optimizer, W_dec, W_dec.dtype, "rows")
        n_layers = len(self.offsets) - 1
        if self.row_step is None or self.row_step.shape != (n_layers, W_dec.shape[0]):  # fresh, or resumed (flushed)
            self.row_step = torch.full((n_layers, W_dec.shape[0]), int(state["step"]), dtype=torch.int64)
            self.drift = torch.zeros(n_layers, W_dec.shape[0], dtype=torch.float64)
            self.drift_eps = torch.zeros_like(self.drift)
        return group, state

    @torch.no_grad()
    def catch_up(self, W_dec: torch.Tensor, source: int, index: torch.Tensor) -> None:
        """Apply the skipped steps of rows `index` of source `source` (see the module docstring)."""
        group, state = self._state(W_dec)
        assert self.row_step is not None and self.drift is not None and self.drift_eps is not None
        now = int(state["step"])
        index_cpu = index.cpu()
        skipped = now - self.row_step[source, index_cpu]
        late = skipped > 0
        if not bool(late.any()):
            return
        index_cpu, skipped = index_cpu[late], skipped[late]
        rows = index_cpu.to(W_dec.device)
        beta1, beta2 = group["betas"]
        param, exp_avg, exp_avg_sq = (
            source_block(t, self.offsets, source) for t in (W_dec, state["exp_avg"], state["exp_avg_sq"])
        )
        m, v = exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
        drift = self.drift[source, index_cpu]
        shift = torch.where(drift > 0, group["eps"] * self.drift_eps[source, index_cpu] / drift, 0.0)
        drift, shift = (t.to(W_dec.device, W_dec.dtype)[:, None] for t in (drift, shift))
        ratio = torch.where(v > 0, m / (v.sqrt() + shift), torch.zeros_like(m))
        param.index_copy_(0, rows, param.index_select(0, rows).sub_(ratio.mul_(drift)))
        skipped_f = skipped.to(torch.float64)[:, None]
        exp_avg.index_copy_(0, rows, m.mul_((beta1**skipped_f).to(W_dec.device, W_dec.dtype)))
        exp_avg_sq.index_copy_(0, rows, v.mul_((beta2**skipped_f).to(W_dec.device, W_dec.dtype)))
        self.row_step[source, index_cpu] = now
        self.drift[source, index_cpu] = 0.0
        self.drift_eps[source, index_cpu] = 0.0

    def _row_views(self, slot: int, tensor: torch.Tensor, source: int) -> tuple[torch.Tensor, ...]:
        """`tensor`'s rows of source `source`, one contiguous [L - source, D] view per feature, made
        once while `tensor` stays the one in `slot` (0: W_dec, 1: exp_avg, 2: exp_avg_sq)."""
        kept = self._views.get((slot, source))
        if kept is None or kept[0] is not tensor:
            kept = self._views[(slot, source)] = (
                tensor,
                tensor[:, self.offsets[source] : self.offsets[source + 1]].unbind(0),
            )
        return kept[1]

    def before_decode(self, W_dec: torch.Tensor, z: torch.Tensor, grad_needed: torch.Tensor | None) -> None:
        """Catch up the rows the coming forward and loss read (z, grad_needed: [B, L, F])."""
        read = z.detach().ne(0).any(dim=0)
        if grad_needed is not None:
            read |= grad_needed.any(dim=0)
        for source in range(read.shape[0]):
            rows = read[source] if not self.reads_all_rows else torch.ones_like(read[source])
            self.catch_up(W_dec, source, rows.nonzero().squeeze(1))

    def flush(self, W_dec: torch.Tensor) -> None:
        """Bring every row up to the current step (before W_dec or the optimizer state is read)."""
        if self.optimizer is None or not self.optimizer.state.get(W_dec):
            return
        everything = torch.arange(W_dec.shape[0], device=W_dec.device)
        for source in range(len(self.offsets) - 1):
            self.catch_up(W_dec, source, everything)

    @torch.no_grad()
    def adam_step(self, optimizer: torch.optim.Optimizer, W_dec: torch.Tensor) -> None:
        """Adam step on the touched rows (gradient times `scale`); the others accumulate drift."""
        if not self.rows:
            return
        self.optimizer = optimizer
        group, state = self._state(W_dec)
        assert self.row_step is not None and self.drift is not None and self.drift_eps is not None
        for source, (index, _) in enumerate(self.rows):
            self.catch_up(W_dec, source, index)
        state["step"] += 1
        step = int(state["step"])
        lr, (beta1, beta2), eps = float(group["lr"]), group["betas"], group["eps"]
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        lists: tuple[list[torch.Tensor], ...] = ([], [], [], [])  # the touched rows: one tensor each
        for source, (index, grad) in enumerate(self.rows):
            grad = grad.to(W_dec.dtype)
            if not (isinstance(self.scale, float) and self.scale == 1.0):
                grad.mul_(self.scale)
            chosen = index.tolist()
            for slot, tensor in enumerate((W_dec, state["exp_avg"], state["exp_avg_sq"])):
                rows, into = self._row_views(slot, tensor, source), lists[slot]
                into.extend(rows[f] for f in chosen)
            lists[3].extend(grad.view(len(chosen), len(self.offsets) - 1 - source, W_dec.shape[2]).unbind(0))
            self.row_step[source, index.cpu()] = step
        params, exp_avgs, exp_avg_sqs, grads = lists
        if params:  # torch's fused Adam over the row views: one pass, the same formula as `full`
            torch._fused_adam_(
                params, grads, exp_avgs, exp_avg_sqs, [], [state["step"]] * len(params),
                lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False,
            )  # fmt: skip
        # every row not stepped now drifts: g_t r^k, and eps's weight g_t r^k / b_t (k = t - row_step)
        behind = (step - self.row_step).to(torch.float64)
        late = behind > 0
        bias_correction1 = 1 - beta1**step
        term = lr * bias_correction2_sqrt / bias_correction1 * torch.pow(beta1 / math.sqrt(beta2), behind)
        self.drift += torch.where(late, term, 0.0)
        term_eps = lr * bias_correction2_sqrt**2 / bias_correction1 * torch.pow(beta1 / beta2, behind)
        self.drift_eps += torch.where(late, term_eps, 0.0)
        self.rows, self.square, self.scale = [], None, 1.0


def enable_row_lazy_adam(
    clt: CrossLayerTranscoder, optimizer: torch.optim.Optimizer, reads_all_rows: bool, clip: bool = True
) -> RowLazyAdam:
    """Route `clt`'s W_dec gradient to a new `RowLazyAdam` bound to `optimizer` (returned)."""
    sink = RowLazyAdam(clip, reads_all_rows)
    sink.bind(optimizer, clt.offsets)
    clt.decoder_grad = sink
    clt.grad_buffer = None
    return sink
