"""The cross-layer transcoder (CLT) as a plain single-device PyTorch module.

The one job of this file: the CLT's parameters and its forward pass (encode, JumpReLU, decode),
with no distributed logic. Every parameter keeps d_features as a plain tensor dimension (dim 0
of W_dec, the last dim of W_enc / b_enc / log_threshold) so a feature-sharded wrapper can
split it across ranks; the decode is a sum over source layers and features, so such a wrapper
all-reduces `decode(z_local, bias=False)` and adds b_dec once.

Shapes (B = tokens in the batch, L = n_layers, D = d_model, F = d_features, P = L (L + 1) / 2):

    x, y, reconstruction   [B, L, D]   MLP inputs / outputs / their reconstruction, per layer
    pre_acts, features     [B, L, F]   h = x W_enc + b_enc and z = JumpReLU(h), per layer
    W_enc                  [L, D, F]   (circuit-tracer stores [L, F, D]: transpose to convert)
    b_enc, log_threshold   [L, F]      jumprelu_threshold = exp(log_threshold)
    W_dec                  [F, P, D]   packed decoders, one slot per (source l, target t >= l)
    b_dec                  [L, D]
    W_skip                 [L, D, D]   optional (`skip=True`): y_hat[:, l] += x[:, l] @ W_skip[l]

Skip connection. With `skip=True` every layer also gets a linear map from its MLP input to its
MLP output (the skip transcoder of Paulo, Shabalin and Belrose 2025, arXiv:2501.18823, which
circuit-tracer's CLT carries as W_skip with the same shape and product). It starts at zero;
the features then learn what the best linear map of each layer leaves. In attribution graphs
the skip is a linear path through the MLP, like attention's frozen OV path: circuit-tracer
passes gradients through it (to the MLP input) and counts it in the reconstruction, not in the
error nodes.

Decoder layout. W_dec packs the P (source, target) pairs with t >= l along dim 1, source-major:
source l owns pairs offsets[l] .. offsets[l + 1] - 1 (targets l .. L-1 in order; see
`pair_offsets`). `W_dec[:, offsets[l]:offsets[l + 1]]` is therefore source l's decoder as a
strided [F, L - l, D] view, circuit-tracer's `W_dec[l]` layout, which `decoder(l)` returns
without a copy, and it is also a BLAS matrix [F, (L - l) D] with leading dimension P D. The
decode is L GEMMs z[:, l] @ W_dec_l -> [B, (L - l) D], each accumulated in place
(addmm_, beta = 1) into reconstruction[:, l:]; the backward is L GEMMs for grad z and L GEMMs
writing grad W_dec straight into its packed slots. Only the P real blocks exist, so there are
no target < source zero blocks to multiply, store, or step with Adam.

Why this layout (benchmarks/train_step.py --layouts: decode forward + both backward GEMMs +
the norm-gradient pass, L=30, D=576, F=1152, B=256, AMD EPYC Zen 4, best of 3, GFLOP/s
counted over the P real blocks only; square fp32 GEMM peak ~88 / ~150-185 GFLOP/s):
                                              1 thread          2 threads
    packed [F, P, D], L GEMMs (this)          5.5 s   86        3.6 s  132
    pairs [P, F, D], one bmm over P pairs     7.5 s   64        5.6 s   84   (+ z gathered per pair)
    masked dense [L F, L D], one GEMM each    10.9 s  44        7.0 s   68   (2x FLOPs; 2x W_dec,
                                                                              grad and Adam state)
The one big masked GEMM is no faster per FLOP than L large GEMMs here, so halving the FLOPs
wins; the pairs bmm runs smaller GEMMs and pays for gathering z and scattering outputs.

`decode_with_norms` (used by `forward`) computes the per-feature decoder norms in the same
autograd node as the decode, so the backward writes the norm terms' gradient into the same
packed buffer that the GEMMs then accumulate onto (one buffer, one pass) instead of autograd
summing two full-size W_dec gradients. `GradBuffer` keeps that buffer across steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import nn

import clt_forge.clt.native as native
from clt_forge.clt.activations import Activated, Gather, make_activation
from clt_forge.clt.init import init_clt
from clt_forge.clt.lazy_adam import RowLazyAdam
from clt_forge.clt.sparse_decode import (
    DECODE,
    DecoderGradSink,
    SparseDecodeWithNorms,
    current_decoder_norms,
    decoder_weight_grad,
    full_decoder_grad,
    grad_square_fn,
)
from clt_forge.clt.sparse_decode import decoder_norms_packed as _decoder_norms_packed
from clt_forge.clt.sparse_decode import source_block as _source_block

__all__ = ["CLTOutput", "CrossLayerTranscoder", "pair_offsets"]


def pair_offsets(n_layers: int) -> list[int]:
    """offsets[l] = index in W_dec's pair dimension of the pair (source l, target l); offsets[L] = P."""
    offsets = [0]
    for source in range(n_layers):
        offsets.append(offsets[-1] + n_layers - source)
    return offsets


@dataclass
class CLTOutput:
    """What one forward pass produces; all [batch, n_layers, *]."""

    pre_acts: Float[torch.Tensor, "batch n_layers d_features"]
    features: Float[torch.Tensor, "batch n_layers d_features"]
    reconstruction: Float[torch.Tensor, "batch n_layers d_model"]
    decoder_norms: Float[torch.Tensor, "n_layers d_features"]
    l0_penalty: bool = True  # whether the L0 sparsity term applies to this activation (clt_loss)


def _decode_packed(z: torch.Tensor, W_dec: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """sum_{l <= t} z[:, l] @ W_dec[l -> t] for every target t: [B, L, D], no bias."""
    batch, n_layers, _ = z.shape
    out = z.new_empty(batch, n_layers, W_dec.shape[2])
    for source in range(n_layers):
        block = _source_block(W_dec, offsets, source)
        dest = out[:, source:].view(batch, -1)
        if source == 0:
            torch.mm(z[:, 0], block, out=dest)
        else:
            dest.addmm_(z[:, source], block)
    return out


def _storage_owners(tensor: torch.Tensor) -> int | None:
    """How many tensors share `tensor`'s storage (None where this torch cannot say)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    storage = tensor.untyped_storage()
    return int(use_count(storage._cdata)) - 1  # minus the `storage` wrapper itself


class GradBuffer:
    """Keeps W_dec's gradient storage between steps so backward does not allocate 1+ GB afresh.

    A fresh multi-GB gradient costs page faults on first touch and an munmap when the optimizer
    sets it to None: ~10% of a CPU step at the benchmark sizes. The buffer is handed out again
    only while nothing else (param.grad, a user's reference, a view) still shares its storage, so
    gradient accumulation and held gradients stay correct; otherwise a new one is allocated.
    """

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None

    def __getstate__(self) -> dict:  # a cache: never pickled or deep-copied with the model
        return {}

    def __setstate__(self, state: dict) -> None:
        self.tensor = None

    def take(self, like: torch.Tensor) -> torch.Tensor:
        buf = self.tensor
        reusable = (
            buf is not None
            and buf.shape == like.shape
            and buf.dtype == like.dtype
            and buf.device == like.device
            and buf.stride() == like.stride()
            and _storage_owners(buf) == 1
        )
        if buf is None or not reusable:
            buf = self.tensor = torch.empty_like(like)
        # A new tensor object over the same storage: autograd adopts it as param.grad without a copy.
        return buf.detach()

    def gradient(
        self,
        W_dec: torch.Tensor,
        offsets: list[int],
        z_t: Callable[[int], torch.Tensor],
        grad_recon: torch.Tensor | None,
        coef: torch.Tensor | None,
        square: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """grad W_dec [F, P, D] in this buffer, block by source layer (a `DecoderGradSink`; the
        clipping reads the built gradient, so `square` is not used)."""
        return full_decoder_grad(self.take(W_dec), W_dec, offsets, z_t, grad_recon, coef)


class _DecodeWithNorms(torch.autograd.Function):
    """(reconstruction without bias [B, L, D], decoder norms [L, F]) from (z, packed W_dec)."""

    @staticmethod
    def forward(
        ctx: Any,
        z: torch.Tensor,
        W_dec: torch.Tensor,
        offsets: list[int],
        grad_buffer: DecoderGradSink | None = None,
        with_norms: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        recon = _decode_packed(z, W_dec, offsets)
        # Without `with_norms` the second output is an empty placeholder (and gets no gradient).
        norms = current_decoder_norms(W_dec, offsets, grad_buffer) if with_norms else W_dec.new_empty(0)
        ctx.save_for_backward(z, W_dec, norms)
        ctx.offsets = offsets
        ctx.grad_buffer = grad_buffer
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        return recon, norms

    @staticmethod
    def backward(ctx: Any, grad_recon: torch.Tensor | None, grad_norms: torch.Tensor | None) -> tuple[Any, ...]:
        z, W_dec, norms = ctx.saved_tensors
        offsets = ctx.offsets
        batch, n_layers, d_features = z.shape
        grad_z = grad_w = grad_z_lbf = None
        if grad_recon is not None:
            grad_recon = grad_recon.contiguous()
        if grad_norms is not None and norms.numel() == 0:
            grad_norms = None
        if ctx.needs_input_grad[0]:
            if grad_recon is None:
                grad_z = torch.zeros_like(z)
            else:
                # Built as [L, B, F] so each source's slice is a contiguous GEMM output.
                grad_z_lbf = z.new_empty(n_layers, batch, d_features)
                for source in range(n_layers):
                    block = _source_block(W_dec, offsets, source)
                    torch.mm(grad_recon[:, source:].view(batch, -1), block.t(), out=grad_z_lbf[source])
                grad_z = grad_z_lbf.permute(1, 0, 2)
        if ctx.needs_input_grad[1]:
            grad_w = decoder_weight_grad(
                W_dec,
                offsets,
                lambda source: z[:, source].t(),
                grad_recon,
                norms,
                grad_norms,
                ctx.grad_buffer,
                grad_square_fn(z, grad_z_lbf, grad_recon, norms),
            )
        return grad_z, grad_w, None, None, None


class CrossLayerTranscoder(nn.Module):
    """A CLT: features read the MLP input of layer l and write to the MLP outputs of layers >= l.

    Parameters (see the module docstring for the shapes and the packed decoder layout):
    W_enc, b_enc, log_threshold, W_dec, b_dec, and W_skip when `skip`. `bandwidth` is the JumpReLU
    STE kernel width eps (0.05, as clt.jumprelu_bandwidth); the weights are initialised by
    `clt_forge.clt.init.init_clt` with `jumprelu_threshold`
    (call `init_encoder_bias` with a batch afterwards to start at a chosen L0); with
    `init=False` they are left uninitialised, for a caller that fills every parameter itself.

    `grad_buffer` reuses W_dec's gradient storage across steps (see `GradBuffer`); a wrapper
    that frees gradients itself after reducing them (FSDP) may set it to None so the full-size
    buffer is not kept alive between steps. `decoder_grad`, when set (clt_forge.clt.deferred,
    `optim.decoder_grad=blocks`; clt_forge.clt.lazy_adam, `rows`), takes W_dec's gradient
    instead: W_dec.grad stays None. `rows` also brings the rows a training forward reads up to date
    first (`RowLazyAdam.before_decode`).

    `activation` names an entry of clt_forge.clt.activations.ACTIVATIONS (jumprelu, topk,
    batchtopk; `k` is TopK's features per token and layer); `decode` an entry of
    clt_forge.clt.sparse_decode.DECODE (auto, dense, sparse), checked per forward; `native_kernel`
    (auto, on, off) whether a sparse fp32 CPU decode runs clt_forge.clt.native's C kernels.
    """

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        d_features: int,
        bandwidth: float = 0.05,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        jumprelu_threshold: float = 0.03,
        init: bool = True,
        activation: str = "jumprelu",
        k: int = 0,
        decode: str = "auto",
        skip: bool = False,
        native_kernel: str = "auto",
    ) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.d_model = d_model
        self.d_features = d_features
        self.bandwidth = bandwidth
        self.offsets = pair_offsets(n_layers)
        self.n_pairs = self.offsets[-1]
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(n_layers, d_model, d_features, **kw))
        self.b_enc = nn.Parameter(torch.empty(n_layers, d_features, **kw))
        self.log_threshold = nn.Parameter(torch.empty(n_layers, d_features, **kw))
        self.W_dec = nn.Parameter(torch.empty(d_features, self.n_pairs, d_model, **kw))
        self.b_dec = nn.Parameter(torch.empty(n_layers, d_model, **kw))
        self.W_skip: nn.Parameter | None = nn.Parameter(torch.empty(n_layers, d_model, d_model, **kw)) if skip else None
        self.grad_buffer: GradBuffer | None = GradBuffer()  # set to None to allocate W_dec.grad afresh
        self.decoder_grad: DecoderGradSink | None = None  # set: W_dec's gradient goes there instead
        self.activation_name, self.k, self.decode_mode = activation, k, decode
        self.activation = make_activation(activation, k)
        self.use_sparse = DECODE.lookup(decode)
        self.native_kernel = native.check_mode(native_kernel)
        self.log_threshold.requires_grad_(self.activation.learns_threshold)
        if init:  # a CLT about to be loaded or sliced into skips it: its values are overwritten
            init_clt(self, jumprelu_threshold=jumprelu_threshold)

    # ---- parameter views -------------------------------------------------------------------

    def jumprelu_threshold(self) -> Float[torch.Tensor, "n_layers d_features"]:
        """theta = exp(log_threshold), differentiable."""
        return self.log_threshold.exp()

    def decoder(self, source: int) -> Float[torch.Tensor, "d_features n_targets d_model"]:
        """Source layer `source`'s decoders to targets source..L-1: a [F, L - source, D] view of W_dec."""
        if not 0 <= source < self.n_layers:
            raise IndexError(f"source layer {source} out of range for {self.n_layers} layers")
        return self.W_dec[:, self.offsets[source] : self.offsets[source + 1]]

    def decoder_norms(self) -> Float[torch.Tensor, "n_layers d_features"]:
        """L2 norm of each feature's decoder vectors concatenated over all its target layers."""
        return _decoder_norms_packed(self.W_dec, self.offsets)

    # ---- forward ---------------------------------------------------------------------------

    def encode(
        self, x: Float[torch.Tensor, "batch n_layers d_model"]
    ) -> tuple[Float[torch.Tensor, "batch n_layers d_features"], Float[torch.Tensor, "batch n_layers d_features"]]:
        """(pre_acts h, features z = activation(h)); one batched matmul over layers.

        Both come back as [B, L, F] views of [L, B, F] storage, so z[:, l] is contiguous.
        """
        h, activated = self.encode_activated(x)
        return h, activated.features

    def encode_activated(
        self, x: Float[torch.Tensor, "batch n_layers d_model"], gather: Gather | None = None
    ) -> tuple[Float[torch.Tensor, "batch n_layers d_features"], Activated]:
        """(h, the activation's output: z and where the decode's backward needs grad z). `gather`
        concatenates across feature shards for activations that rank all features (TopK)."""
        h = torch.baddbmm(self.b_enc[:, None, :], x.transpose(0, 1), self.W_enc).permute(1, 0, 2)
        return h, self.activation(h, self, gather)

    def decode(
        self, z: Float[torch.Tensor, "batch n_layers d_features"], bias: bool = True
    ) -> Float[torch.Tensor, "batch n_layers d_model"]:
        """y_hat[:, t] = sum_{l <= t} z[:, l] @ W_dec[l -> t] (+ b_dec[t] when `bias`)."""
        recon, _ = self._decode(z, with_norms=False)
        return recon + self.b_dec if bias else recon

    def decode_with_norms(
        self,
        z: Float[torch.Tensor, "batch n_layers d_features"],
        bias: bool = True,
        grad_needed: torch.Tensor | None = None,
    ) -> tuple[Float[torch.Tensor, "batch n_layers d_model"], Float[torch.Tensor, "n_layers d_features"]]:
        """(decode(z, bias), decoder_norms()) from one autograd node, so the gradients of the
        reconstruction and of the norm terms land in one W_dec buffer in one pass. A sparse decode
        computes grad z only where `grad_needed` (from the activation; None: everywhere), which
        holds every entry where z != 0 (the activations' do)."""
        if isinstance(self.decoder_grad, RowLazyAdam) and torch.is_grad_enabled():
            self.decoder_grad.before_decode(self.W_dec, z, grad_needed)  # rows read now: up to date
        recon, norms = self._decode(z, with_norms=True, grad_needed=grad_needed)
        return (recon + self.b_dec if bias else recon), norms

    def _decode(
        self, z: torch.Tensor, with_norms: bool, grad_needed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the packed decode in one dtype: autocast's where autocast is on (as nn.Linear
        would: both operands cast, outputs in that dtype), else W_dec's."""
        device_type = z.device.type
        W_dec: torch.Tensor = self.W_dec
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            z, W_dec = z.to(dtype), W_dec.to(dtype)
        elif z.dtype != W_dec.dtype:
            z = z.to(W_dec.dtype)
        with torch.autocast(device_type, enabled=False):
            sink = self.decoder_grad if self.decoder_grad is not None else self.grad_buffer
            if self.use_sparse(z):
                return SparseDecodeWithNorms.apply(
                    z, W_dec, self.offsets, sink, with_norms, grad_needed, native.usable(self.native_kernel, z, W_dec)
                )
            return _DecodeWithNorms.apply(z, W_dec, self.offsets, sink, with_norms)

    def skip(self, x: Float[torch.Tensor, "batch n_layers d_model"]) -> Float[torch.Tensor, "batch n_layers d_model"]:
        """The skip connection's term x[:, l] @ W_skip[l] of every layer (zeros without one)."""
        if self.W_skip is None:
            return torch.zeros_like(x)
        return torch.bmm(x.transpose(0, 1), self.W_skip).transpose(0, 1)

    def forward(self, x: Float[torch.Tensor, "batch n_layers d_model"]) -> CLTOutput:
        """Encode, activate, decode (+ the skip term); also returns the decoder norms the loss needs."""
        h, activated = self.encode_activated(x)
        recon, norms = self.decode_with_norms(activated.features, grad_needed=activated.grad_needed)
        if self.W_skip is not None:
            recon = recon + self.skip(x)
        return CLTOutput(h, activated.features, recon, norms, l0_penalty=self.activation.l0_penalty)
