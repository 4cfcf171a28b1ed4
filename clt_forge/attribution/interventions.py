"""Interventions on CLT features: set or scale features (or whole clusters) and read the logits.

A thin, typed layer over circuit-tracer's `feature_intervention` (which takes absolute values
per (layer, position, feature)): a scale is turned into a value from the features' clean
activations, and the result is the top next-token probabilities before and after, which is
what `clt serve` charts. A cluster (`clt_forge.artifacts.graph.Cluster`) is edited through
its CLT feature members: one `FeatureEdit` each.

Options, as in circuit-tracer: `freeze_attention` replays the clean attention patterns;
`constrained_layers` (a range) limits the edit to those layers and keeps it from propagating
through later transcoder features (the paper's "constrained" patching). Token ids are passed,
never strings, so positions line up with the graph's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel

from clt_forge.errors import CLTError

__all__ = ["FeatureEdit", "InterventionResult", "TokenChange", "intervene"]


@dataclass(frozen=True)
class FeatureEdit:
    """Set feature `feature` of layer `layer` at token position `pos` to `value`, or multiply it
    by `scale` (exactly one of the two)."""

    layer: int
    pos: int
    feature: int
    value: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.scale is None):
            raise CLTError(f"feature edit {self}: give exactly one of value= or scale=.")


@dataclass
class TokenChange:
    token: str
    token_id: int
    prob_before: float
    prob_after: float
    logit_before: float
    logit_after: float

    @property
    def delta(self) -> float:
        return self.prob_after - self.prob_before


@dataclass
class InterventionResult:
    top_after: list[TokenChange]  # the k most likely next tokens after the edit
    top_before: list[TokenChange]  # the k most likely next tokens before it
    largest_changes: list[TokenChange]  # the k tokens whose probability moved most
    edits: list[tuple[int, int, int, float]]  # the absolute values applied


@torch.no_grad()
def intervene(
    model: TransformerLensReplacementModel,
    tokens: torch.Tensor | Sequence[int],
    edits: Iterable[FeatureEdit],
    *,
    top_k: int = 10,
    freeze_attention: bool = True,
    constrained_layers: range | None = None,
) -> InterventionResult:
    """Apply `edits` to the forward pass on `tokens` and compare next-token probabilities."""
    ids = torch.as_tensor(list(tokens) if not isinstance(tokens, torch.Tensor) else tokens).flatten()
    ids = ids.to(model.cfg.device)
    edits = list(edits)
    if not edits:
        raise CLTError("no feature edits given: nothing to intervene on.")
    n_layers, n_pos = model.cfg.n_layers, len(ids)
    d_features = int(cast(Any, model.transcoders).d_transcoder)
    for edit in edits:
        if not (0 <= edit.layer < n_layers and 0 <= edit.pos < n_pos and 0 <= edit.feature < d_features):
            raise CLTError(
                f"feature edit {edit} is out of range: layers 0..{n_layers - 1}, "
                f"positions 0..{n_pos - 1}, features 0..{d_features - 1}."
            )
    clean_logits, activations = model.get_activations(ids)
    absolute = [(e.layer, e.pos, e.feature, _absolute(e, activations)) for e in edits]
    new_logits, _ = cast(Any, model).feature_intervention(  # torch.no_grad hides its signature
        ids,
        absolute,
        constrained_layers=constrained_layers,
        freeze_attention=freeze_attention,
        return_activations=False,
    )
    before, after = clean_logits[0, -1].float(), new_logits[0, -1].float()
    p_before, p_after = before.softmax(-1), after.softmax(-1)

    def change(token_id: int) -> TokenChange:
        return TokenChange(
            token=model.tokenizer.decode([token_id]),  # type: ignore[union-attr]
            token_id=token_id,
            prob_before=float(p_before[token_id]),
            prob_after=float(p_after[token_id]),
            logit_before=float(before[token_id]),
            logit_after=float(after[token_id]),
        )

    k = min(top_k, p_after.numel())
    return InterventionResult(
        top_after=[change(t) for t in p_after.topk(k).indices.tolist()],
        top_before=[change(t) for t in p_before.topk(k).indices.tolist()],
        largest_changes=[change(t) for t in (p_after - p_before).abs().topk(k).indices.tolist()],
        edits=absolute,
    )


def _absolute(edit: FeatureEdit, activations: torch.Tensor) -> float:
    if edit.value is not None:
        return edit.value
    assert edit.scale is not None
    return float(activations[edit.layer, edit.pos, edit.feature]) * edit.scale
