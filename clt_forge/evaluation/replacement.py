"""The replacement model: the language model with its MLPs replaced by the CLT, no error terms.

    scores = replacement_scores(model, clt, normalization, windows)   # windows [n, context]

All layers at once: the model runs with every MLP's output replaced by the CLT's reconstruction
of it, the CLT reading the MLP inputs of that same (replaced) run, layer by layer, as the
paper's local replacement model does without its error nodes. One layer at a time: the model
runs with only layer l's MLP output replaced, from the features of the original run (which are
the replaced run's too: nothing before layer l changed). Each run is compared to the original
model's next-token distribution at every position after BOS: KL(original || replaced) in nats,
averaged over positions, and top-1 agreement (the same argmax).

Position 0 (BOS) keeps its own MLP outputs: the CLT never trained on BOS (it is never cached),
whose massive activations the attention of every later position leans on. The CLT runs as
circuit-tracer runs it: JumpReLU at its thresholds (TopK / BatchTopK: its inference thresholds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from clt_forge.artifacts.normalization import Normalization
from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.errors import CLTError
from clt_forge.models.activations import DEFAULT_HOOKS

__all__ = ["ReplacementScores", "replacement_scores"]


@dataclass
class ReplacementScores:
    kl: float  # every MLP replaced: mean KL(original || replaced), nats per position
    top1: float  # every MLP replaced: share of positions with the original's top next token
    layer_kl: list[float]  # only layer l replaced
    layer_top1: list[float]
    positions: int  # positions scored (all windows, BOS excluded)

    def worst_layers(self, n: int = 3) -> list[int]:
        """The layers whose replacement alone hurts most (highest KL first)."""
        return sorted(range(len(self.layer_kl)), key=lambda layer: -self.layer_kl[layer])[:n]


Hook = Callable[[torch.nn.Module, tuple, torch.Tensor], torch.Tensor]


class _Replacer:
    """Encodes one layer at a time and decodes into any target layer, in model units."""

    def __init__(self, clt: CrossLayerTranscoder, normalization: Normalization) -> None:
        self.clt = clt
        self.in_scale = normalization.in_scale.to(clt.W_enc.device)
        self.out_scale = normalization.out_scale.to(clt.W_enc.device)

    def features(self, layer: int, mlp_in: torch.Tensor) -> torch.Tensor:
        """z of `layer` [tokens, F] from its MLP inputs [tokens, D]."""
        clt = self.clt
        h_layer = (mlp_in / self.in_scale[layer]) @ clt.W_enc[layer] + clt.b_enc[layer]
        h = h_layer.new_zeros(h_layer.shape[0], clt.n_layers, clt.d_features)
        h[:, layer] = h_layer  # every activation acts per (token, layer) at inference
        return clt.activation(h, clt, None).features[:, layer]

    def reconstruction(self, target: int, features: list[torch.Tensor], mlp_in: torch.Tensor) -> torch.Tensor:
        """The CLT's MLP output of `target` [tokens, D] from the features of layers 0..target and,
        for a CLT with a skip connection, `target`'s own MLP input [tokens, D]."""
        clt = self.clt
        recon = clt.b_dec[target].expand(features[0].shape[0], -1).clone()
        for source in range(target + 1):
            recon += features[source] @ clt.decoder(source)[:, target - source]
        if clt.W_skip is not None:
            recon += (mlp_in / self.in_scale[target]) @ clt.W_skip[target]
        return recon * self.out_scale[target]


@torch.no_grad()
def replacement_scores(
    model: HookedTransformer,
    clt: CrossLayerTranscoder,
    normalization: Normalization,
    windows: torch.Tensor,
    per_layer: bool = True,
    batch_size: int = 8,
    hooks: tuple[str, str] = DEFAULT_HOOKS,
) -> ReplacementScores:
    """KL and top-1 agreement of the replacement model on `windows` [n, context] (BOS first).
    `hooks`: the CLT's (input, output) hooks; only the MLP's own input and output are replaced."""
    if tuple(hooks) != DEFAULT_HOOKS:
        raise CLTError(
            f"the replacement model replaces MLPs: it needs a CLT reading the MLP's input and writing its output "
            f"({DEFAULT_HOOKS[0]}, {DEFAULT_HOOKS[1]}); this one reads {hooks[0]} and writes {hooks[1]}."
        )
    was_training = clt.training
    clt.eval()
    replacer = _Replacer(clt, normalization)
    n_layers = clt.n_layers
    sums = torch.zeros(2 + 2 * n_layers, dtype=torch.float64)  # kl, top1, then per layer kl, top1
    positions = 0
    try:
        for start in range(0, windows.shape[0], batch_size):
            tokens = windows[start : start + batch_size].to(clt.W_enc.device)
            clean, inputs = _clean_run(model, tokens)
            sums[:2] += _compare(clean, _run(model, tokens, _all_layers_hooks(replacer, n_layers)))
            if per_layer:
                features = [replacer.features(s, inputs[s].flatten(0, 1)) for s in range(n_layers)]
                for layer in range(n_layers):
                    recon = replacer.reconstruction(layer, features, inputs[layer].flatten(0, 1)).view_as(inputs[layer])
                    patch = {layer: _replace_with(recon)}
                    sums[2 + 2 * layer : 4 + 2 * layer] += _compare(clean, _run(model, tokens, patch))
            positions += tokens.shape[0] * (tokens.shape[1] - 1)
    finally:
        clt.train(was_training)
    means = (sums / max(positions, 1)).tolist()
    layer_kl = means[2::2] if per_layer else []
    layer_top1 = means[3::2] if per_layer else []
    return ReplacementScores(means[0], means[1], layer_kl, layer_top1, positions)


def _clean_run(model: HookedTransformer, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The original log-probabilities and every layer's MLP input [batch, pos, D]."""
    inputs: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        inputs.append(args[0].float())
        return output

    logits = _run(model, tokens, {layer: record for layer in range(model.cfg.n_layers)})
    return logits, inputs


def _all_layers_hooks(replacer: _Replacer, n_layers: int) -> dict[int, Hook]:
    features: list[torch.Tensor] = []

    def hook_for(layer: int) -> Hook:
        def replace(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            mlp_in = args[0][:, 1:].float()
            features.append(replacer.features(layer, mlp_in.flatten(0, 1)))
            recon = replacer.reconstruction(layer, features, mlp_in.flatten(0, 1)).view_as(mlp_in)
            return _replace_with(recon)(module, args, output)

        return replace

    return {layer: hook_for(layer) for layer in range(n_layers)}


def _replace_with(recon: torch.Tensor) -> Hook:
    """A hook putting recon [batch, pos - 1, D] in place of the MLP output after BOS."""

    def replace(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        patched = output.clone()
        patched[:, 1:] = recon[:, -(output.shape[1] - 1) :].to(output.dtype)
        return patched

    return replace


def _run(model: HookedTransformer, tokens: torch.Tensor, hooks: dict[int, Hook]) -> torch.Tensor:
    mlps: list[torch.nn.Module] = [block.mlp for block in model.blocks]  # type: ignore[misc]
    handles = [mlps[layer].register_forward_hook(hook) for layer, hook in hooks.items()]
    try:
        return model(tokens).float().log_softmax(-1)
    finally:
        for handle in handles:
            handle.remove()


def _compare(clean: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
    """(sum of KL(clean || replaced), count of equal argmax) over positions after BOS."""
    clean, replaced = clean[:, 1:], replaced[:, 1:]
    kl = (clean.exp() * (clean - replaced)).sum(-1)
    agree = clean.argmax(-1) == replaced.argmax(-1)
    return torch.tensor([kl.double().sum().item(), agree.double().sum().item()])
