"""Read every layer's exact MLP input and output from a HookedTransformer.

The MLP input is what the MLP module receives (the ln2-normed residual times the ln2 gain),
the MLP output what it returns: the same tensors circuit-tracer's ReplacementModel exposes as
`blocks.{layer}.mlp.hook_in` / `blocks.{layer}.mlp.hook_out`, which is what the CLT must be
trained on for attribution to be faithful. We hook the MLP modules themselves so the
definition holds for every architecture TransformerLens builds.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from transformer_lens import HookedTransformer

HOOK_IN = "blocks.{layer}.mlp.hook_in"
HOOK_OUT = "blocks.{layer}.mlp.hook_out"


def hook_names(n_layers: int) -> dict[str, list[str]]:
    return {
        "mlp_in": [HOOK_IN.format(layer=layer) for layer in range(n_layers)],
        "mlp_out": [HOOK_OUT.format(layer=layer) for layer in range(n_layers)],
    }


@torch.no_grad()
def mlp_activations(
    model: HookedTransformer,
    tokens: Int[torch.Tensor, "batch pos"],
    dtype: torch.dtype = torch.float32,
) -> tuple[Float[torch.Tensor, "batch pos n_layers d_model"], Float[torch.Tensor, "batch pos n_layers d_model"]]:
    """MLP inputs and outputs of every layer, as [batch, pos, n_layers, d_model] each.

    The forward pass stops after the last block (no final norm or unembedding).
    """
    shape = (*tokens.shape, model.cfg.n_layers, model.cfg.d_model)
    inputs = torch.empty(shape, dtype=dtype, device=tokens.device)
    outputs = torch.empty(shape, dtype=dtype, device=tokens.device)
    _record(model, tokens, inputs, outputs, first=0)
    return inputs, outputs


@torch.no_grad()
def _record(
    model: HookedTransformer, tokens: torch.Tensor, inputs: torch.Tensor, outputs: torch.Tensor, first: int
) -> None:
    """Run the model on tokens [B, S] up to its last block, writing positions first.. of every
    layer's MLP input and output into inputs/outputs [B, S - first, n_layers, d_model] (any
    strides, any device: each hook copies its layer straight in)."""
    handles = []
    for layer, block in enumerate(model.blocks):

        def record(module: torch.nn.Module, args: tuple, output: torch.Tensor, layer: int = layer) -> None:
            inputs[:, :, layer] = args[0][:, first:]
            outputs[:, :, layer] = output[:, first:]

        mlp: torch.nn.Module = block.mlp  # type: ignore[assignment]
        handles.append(mlp.register_forward_hook(record))
    try:
        model(tokens, stop_at_layer=model.cfg.n_layers)
    finally:
        for handle in handles:
            handle.remove()


def window_activations(
    model: HookedTransformer,
    windows: Int[torch.Tensor, "n_windows context"],
    skip_first: bool,
    batch_size: int,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[
    Int[torch.Tensor, " tokens"],
    Float[torch.Tensor, "tokens n_layers d_model"],
    Float[torch.Tensor, "tokens n_layers d_model"],
]:
    """Token ids and MLP inputs/outputs of whole context windows, flattened to one row per
    stored token, on the CPU. `skip_first` drops position 0 (BOS), which is never stored.

    The hooks write each layer straight into its rows of the returned tensors (on a CPU model;
    a GPU model's batch is copied over once), so no activation is copied twice. `out`: two
    float32 buffers of at least n_windows * (context - skip_first) * n_layers * d_model values
    to write into (reusing them saves the page faults of fresh memory: ~40 ms per 1,024 tokens
    of the embedded model); the returned tensors are views of them."""
    first = 1 if skip_first else 0
    n_windows, length = windows.shape
    device = next(model.parameters()).device
    shape = (n_windows, length - first, model.cfg.n_layers, model.cfg.d_model)
    if out is None:
        inputs, outputs = torch.empty(shape), torch.empty(shape)
    else:
        size = math.prod(shape)
        if min(buffer.numel() for buffer in out) < size:
            raise ValueError(f"window_activations: out buffers hold fewer than the {size} values {shape} needs")
        inputs, outputs = (buffer.view(-1)[:size].view(shape) for buffer in out)
    for start in range(0, n_windows, batch_size):
        batch = windows[start : start + batch_size].to(device)
        rows = slice(start, start + len(batch))
        if device.type == "cpu":
            _record(model, batch, inputs[rows], outputs[rows], first)
        else:
            batch_in = torch.empty(inputs[rows].shape, device=device)
            batch_out = torch.empty_like(batch_in)
            _record(model, batch, batch_in, batch_out, first)
            inputs[rows].copy_(batch_in)
            outputs[rows].copy_(batch_out)
    return windows[:, first:].flatten(), inputs.flatten(0, 1), outputs.flatten(0, 1)
