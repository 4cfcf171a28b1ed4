"""Read every layer's exact MLP input and output from a HookedTransformer.

The MLP input is what the MLP module receives (the ln2-normed residual times the ln2 gain),
the MLP output what it returns: the same tensors circuit-tracer's ReplacementModel exposes as
`blocks.{layer}.mlp.hook_in` / `blocks.{layer}.mlp.hook_out`, which is what the CLT must be
trained on for attribution to be faithful. We hook the MLP modules themselves so the
definition holds for every architecture TransformerLens builds.
"""

from __future__ import annotations

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
    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    shape = (*tokens.shape, n_layers, d_model)
    inputs = torch.empty(shape, dtype=dtype, device=tokens.device)
    outputs = torch.empty(shape, dtype=dtype, device=tokens.device)
    handles = []
    for layer, block in enumerate(model.blocks):

        def record(module: torch.nn.Module, args: tuple, output: torch.Tensor, layer: int = layer) -> None:
            inputs[:, :, layer] = args[0]
            outputs[:, :, layer] = output

        mlp: torch.nn.Module = block.mlp  # type: ignore[assignment]
        handles.append(mlp.register_forward_hook(record))
    try:
        model(tokens, stop_at_layer=n_layers)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


def window_activations(
    model: HookedTransformer, windows: Int[torch.Tensor, "n_windows context"], skip_first: bool, batch_size: int
) -> tuple[
    Int[torch.Tensor, " tokens"],
    Float[torch.Tensor, "tokens n_layers d_model"],
    Float[torch.Tensor, "tokens n_layers d_model"],
]:
    """Token ids and MLP inputs/outputs of whole context windows, flattened to one row per
    stored token, on the CPU. `skip_first` drops position 0 (BOS), which is never stored."""
    first = 1 if skip_first else 0
    device = next(model.parameters()).device
    parts_in, parts_out = [], []
    for start in range(0, windows.shape[0], batch_size):
        mlp_in, mlp_out = mlp_activations(model, windows[start : start + batch_size].to(device))
        parts_in.append(mlp_in[:, first:].flatten(0, 1).cpu())
        parts_out.append(mlp_out[:, first:].flatten(0, 1).cpu())
    return windows[:, first:].flatten(), torch.cat(parts_in), torch.cat(parts_out)
