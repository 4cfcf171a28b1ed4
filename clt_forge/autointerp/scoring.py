"""Detection scores: how well an explanation tells a feature's firing contexts from silent ones.

The scorer sees the explanation and held-out contexts (a seeded shuffle of firing and silent ones,
without highlighting) and says, per context, whether the feature fires. The score is the balanced
accuracy (TPR + TNR) / 2: 1.0 is a perfect explanation, 0.5 is chance whatever the class balance.

Two protocols (prompts.py): `detection_score` asks one yes/no question per context through
`Explainer.judge` (the local explainer scores it from log-probabilities); `list_detection_score`
shows every context in one numbered list and parses the answer (capable OpenAI-compatible models).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from clt_forge.artifacts.features import Example
from clt_forge.autointerp.explainers import Explainer
from clt_forge.autointerp.prompts import detection_messages, detection_question, parse_detection

__all__ = ["GOOD_SCORE", "DetectionScore", "detection_score", "list_detection_score", "summarize"]

GOOD_SCORE = 0.7  # the summary reports the share of features scoring at least this
SHARE_GOOD = f"share_ge_{GOOD_SCORE}"


@dataclass(frozen=True)
class DetectionScore:
    """Balanced accuracy of one explanation; a rate is NaN when its class had no context (and then
    so is the balanced accuracy)."""

    balanced_accuracy: float
    true_positive_rate: float  # firing contexts judged firing / firing contexts
    true_negative_rate: float  # silent contexts judged silent / silent contexts
    n: int  # contexts judged

    @classmethod
    def from_judgements(cls, labels: Sequence[bool], predictions: Sequence[bool]) -> DetectionScore:
        pairs = list(zip(labels, predictions, strict=True))
        positives = [predicted for label, predicted in pairs if label]
        negatives = [not predicted for label, predicted in pairs if not label]
        tpr = sum(positives) / len(positives) if positives else math.nan
        tnr = sum(negatives) / len(negatives) if negatives else math.nan
        return cls((tpr + tnr) / 2, tpr, tnr, len(pairs))


def _shuffled(
    activating: Sequence[Example], non_activating: Sequence[Example], seed: int
) -> list[tuple[Example, bool]]:
    mix = [(example, True) for example in activating] + [(example, False) for example in non_activating]
    random.Random(seed).shuffle(mix)
    return mix


def detection_score(
    explainer: Explainer, explanation: str, activating: Sequence[Example], non_activating: Sequence[Example], seed: int
) -> DetectionScore:
    """One yes/no question per context; a context counts as judged firing when P(yes) > 0.5."""
    mix = _shuffled(activating, non_activating, seed)
    if not mix:
        return DetectionScore.from_judgements([], [])
    scores = explainer.judge([detection_question(explanation, example) for example, _ in mix])
    return DetectionScore.from_judgements([label for _, label in mix], [score > 0.5 for score in scores])


def list_detection_score(
    explainer: Explainer, explanation: str, activating: Sequence[Example], non_activating: Sequence[Example], seed: int
) -> DetectionScore:
    """Every context in one numbered list; the answer is read with `parse_detection`."""
    mix = _shuffled(activating, non_activating, seed)
    if not mix:
        return DetectionScore.from_judgements([], [])
    (answer,) = explainer.explain([detection_messages(explanation, [example for example, _ in mix])])
    return DetectionScore.from_judgements([label for _, label in mix], parse_detection(answer, len(mix)))


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(scores: Sequence[float | None]) -> dict[str, float | int | None]:
    """count, mean, median, q25, q75, min, max and share_ge_0.7 (share >= GOOD_SCORE) of the
    detection scores; None and NaN scores are left out (counted in `missing`)."""
    valid = sorted(float(s) for s in scores if s is not None and not math.isnan(s))
    summary: dict[str, float | int | None] = {"count": len(valid), "missing": len(scores) - len(valid)}
    if not valid:
        return summary | dict.fromkeys(("mean", "median", "q25", "q75", "min", "max", SHARE_GOOD))
    return summary | {
        "mean": sum(valid) / len(valid),
        "median": _quantile(valid, 0.5),
        "q25": _quantile(valid, 0.25),
        "q75": _quantile(valid, 0.75),
        "min": valid[0],
        "max": valid[-1],
        SHARE_GOOD: sum(s >= GOOD_SCORE for s in valid) / len(valid),
    }
