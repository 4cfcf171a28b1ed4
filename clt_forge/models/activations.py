"""Read every layer's CLT input and output from a HookedTransformer, at configurable hook points.

By default the MLP input and output: the MLP input is what the MLP module receives (the
ln2-normed residual times the ln2 gain), the MLP output what it returns: the same tensors
circuit-tracer's ReplacementModel exposes as `blocks.{layer}.mlp.hook_in` /
`blocks.{layer}.mlp.hook_out`. We hook the MLP modules themselves so the definition holds for
every architecture TransformerLens builds.

Other hook points are named block-relative, as circuit-tracer's `feature_input_hook` /
`feature_output_hook` are (`ModelConfig.hook_in` / `hook_out`): any TransformerLens hook point of
a block, e.g. `hook_resid_mid` (the residual stream before the MLP's norm: what the published
circuit-tracer CLTs for Gemma-2-2B and Llama-3.2-1B read), `hook_mlp_out` (the block's MLP
contribution to the residual: after Gemma-2's post-MLP norm) or `ln2.hook_normalized`
(docs/hooks.md). A hook point that does not run in the model's forward is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float, Int
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from clt_forge.artifacts.activations import DEFAULT_HOOK_IN, DEFAULT_HOOK_OUT, block_relative, hook_names
from clt_forge.errors import CLTError

HOOK_IN = "blocks.{layer}." + DEFAULT_HOOK_IN
HOOK_OUT = "blocks.{layer}." + DEFAULT_HOOK_OUT
HOOKS_ATTRIBUTE = "clt_forge_hooks"  # set by `use_hooks`: where `window_activations` reads by default

Hooks = tuple[str, str]  # block-relative (input hook, output hook)
DEFAULT_HOOKS: Hooks = (DEFAULT_HOOK_IN, DEFAULT_HOOK_OUT)

__all__ = [
    "DEFAULT_HOOKS",
    "DEFAULT_HOOK_IN",
    "DEFAULT_HOOK_OUT",
    "Hooks",
    "block_relative",
    "configured_hooks",
    "hook_names",
    "mlp_activations",
    "model_hooks",
    "use_hooks",
    "window_activations",
]


def configured_hooks(model_cfg: Any) -> Hooks:
    """The block-relative hooks a model config declares (`hook_in` / `hook_out`; null: the MLP's)."""
    return (
        getattr(model_cfg, "hook_in", None) or DEFAULT_HOOK_IN,
        getattr(model_cfg, "hook_out", None) or DEFAULT_HOOK_OUT,
    )


def use_hooks(model: HookedTransformer, hooks: Hooks) -> HookedTransformer:
    """Make `hooks` where this model's activations are read when no call names any (e.g. the
    on-the-fly training store, clt_forge/data/store.py). Returns the model."""
    setattr(model, HOOKS_ATTRIBUTE, tuple(hooks))
    return model


def model_hooks(model: HookedTransformer) -> Hooks:
    """The hooks `use_hooks` set on the model, else the MLP's own input and output."""
    hooks = getattr(model, HOOKS_ATTRIBUTE, None)
    return DEFAULT_HOOKS if hooks is None else (hooks[0], hooks[1])


@torch.no_grad()
def mlp_activations(
    model: HookedTransformer,
    tokens: Int[torch.Tensor, "batch pos"],
    dtype: torch.dtype = torch.float32,
    hooks: Hooks | None = None,
) -> tuple[Float[torch.Tensor, "batch pos n_layers d_model"], Float[torch.Tensor, "batch pos n_layers d_model"]]:
    """Every layer's CLT inputs and outputs (default: the MLP's; `hooks`: block-relative hook
    points, else the model's `use_hooks`), as [batch, pos, n_layers, d_model] each.

    The forward pass stops after the last block (no final norm or unembedding).
    """
    shape = (*tokens.shape, model.cfg.n_layers, model.cfg.d_model)
    inputs = torch.empty(shape, dtype=dtype, device=tokens.device)
    outputs = torch.empty(shape, dtype=dtype, device=tokens.device)
    _record(model, tokens, inputs, outputs, first=0, hooks=hooks or model_hooks(model))
    return inputs, outputs


def _hook_module(block: torch.nn.Module, name: str, layer: int) -> tuple[torch.nn.Module, bool]:
    """The module whose forward hook sees hook point `name` of a block, and whether the value is
    the module's input (the MLP's own input) rather than its output."""
    if name in (DEFAULT_HOOK_IN, DEFAULT_HOOK_OUT):
        return block.get_submodule("mlp"), name == DEFAULT_HOOK_IN
    try:
        module = block.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, HookPoint):
        points = [n for n, m in block.named_modules() if isinstance(m, HookPoint)]
        raise CLTError(
            f"hook {name!r} is not a hook point of block {layer} (block-relative names: "
            f"{', '.join([DEFAULT_HOOK_IN, DEFAULT_HOOK_OUT, *points])})."
        )
    return module, False


@torch.no_grad()
def _record(
    model: HookedTransformer,
    tokens: torch.Tensor,
    inputs: torch.Tensor,
    outputs: torch.Tensor,
    first: int,
    hooks: Hooks = DEFAULT_HOOKS,
) -> None:
    """Run the model on tokens [B, S] up to its last block, writing positions first.. of every
    layer's activations at the block-relative `hooks` (input, output) into inputs/outputs
    [B, S - first, n_layers, d_model] (any strides, any device: each hook copies its layer
    straight in). Refuses a hook point that did not run."""
    handles = []
    fired: set[tuple[str, int]] = set()
    for layer, block in enumerate(model.blocks):
        for kind, name, into in (("in", hooks[0], inputs), ("out", hooks[1], outputs)):
            module, from_input = _hook_module(block, name, layer)
            handles.append(module.register_forward_hook(_writer(into, layer, first, from_input, fired, (kind, layer))))
    try:
        model(tokens, stop_at_layer=model.cfg.n_layers)
    finally:
        for handle in handles:
            handle.remove()
    missing = [
        (kind, layer) for layer in range(model.cfg.n_layers) for kind in ("in", "out") if (kind, layer) not in fired
    ]
    if missing:
        kind, layer = missing[0]
        name = hooks[0] if kind == "in" else hooks[1]
        raise CLTError(
            f"hook {name!r} of block {layer} did not run in {model.cfg.model_name}'s forward "
            "(e.g. hook_resid_mid in a block with parallel attention and MLP): choose another hook point."
        )


def _writer(
    into: torch.Tensor, layer: int, first: int, from_input: bool, fired: set[tuple[str, int]], key: tuple[str, int]
) -> Callable[[torch.nn.Module, tuple, torch.Tensor], None]:
    def write(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        value = args[0] if from_input else output
        into[:, :, layer] = value[:, first:]
        fired.add(key)

    return write


def window_activations(
    model: HookedTransformer,
    windows: Int[torch.Tensor, "n_windows context"],
    skip_first: bool,
    batch_size: int,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    hooks: Hooks | None = None,
) -> tuple[
    Int[torch.Tensor, " tokens"],
    Float[torch.Tensor, "tokens n_layers d_model"],
    Float[torch.Tensor, "tokens n_layers d_model"],
]:
    """Token ids and CLT inputs/outputs (at `hooks`, block-relative; None: the model's `use_hooks`,
    else the MLP's own input and output) of whole context windows, flattened to one row per
    stored token, on the CPU. `skip_first` drops position 0 (BOS), which is never stored.

    The hooks write each layer straight into its rows of the returned tensors (on a CPU model;
    a GPU model's batch is copied over once), so no activation is copied twice. `out`: two
    float32 buffers of at least n_windows * (context - skip_first) * n_layers * d_model values
    to write into (reusing them saves the page faults of fresh memory: ~40 ms per 1,024 tokens
    of the embedded model); the returned tensors are views of them."""
    hooks = hooks or model_hooks(model)
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
            _record(model, batch, inputs[rows], outputs[rows], first, hooks)
        else:
            batch_in = torch.empty(inputs[rows].shape, device=device)
            batch_out = torch.empty_like(batch_in)
            _record(model, batch, batch_in, batch_out, first, hooks)
            inputs[rows].copy_(batch_in)
            outputs[rows].copy_(batch_out)
    return windows[:, first:].flatten(), inputs.flatten(0, 1), outputs.flatten(0, 1)
