"""Detection scores: how well an explanation tells a feature's firing contexts from silent ones.

The judge (`Explainer.judge`) sees the explanation and one held-out context at a time (no
highlighting) and gives P(yes), "the feature fires on this text". The score is threshold-free:
the AUROC of P(yes) over the firing contexts against the silent ones (1.0: every firing context
ranked above every silent one; 0.5: chance, whatever the class balance or the judge's calibration).
The firing contexts are spread over the feature's activation range (`spread`: evenly spaced ranks
of a uniform sample), so weak activations count as much as the top ones.

Every score comes with a control: the same judge, the same contexts, another feature's
explanation (`pick_control`). A judge that cannot read explanations gives score ~ control; a
scorer whose mean score does not beat its mean control by INFORMATIVE_MARGIN (and by two standard
errors of the paired differences) is reported as uninformative (`verdict`).

Two scorers (`scorer`), each with its control:
- `context` (the above): does the feature fire anywhere in this text?
- `token` (delphi's fuzzing, one token at a time): each held-out firing context with the token where
  it peaks in `<<` `>>` (positives), and each context, firing or silent, with one token where the
  feature is 0 marked (negatives, seeded); "does the feature fire on the marked token?"
  (`prompts.token_question`). A claim about a common token ("the", a newline) can be scored here
  (in context detection nearly every text holds one), and so can a feature that fires somewhere in
  every context (no silent context: its negatives come from its firing contexts' silent tokens).

Also kept: balanced accuracy at P(yes) > 0.5 (`detection_score`, the TPR / TNR columns) and the
list protocol (`list_detection_score`: every context in one numbered list, for capable endpoints).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tqdm import tqdm

from clt_forge.artifacts.features import Example, FeatureEvidence, FeatureStore
from clt_forge.autointerp.explainers import Explainer
from clt_forge.autointerp.prompts import detection_messages, detection_question, parse_detection, token_question
from clt_forge.errors import CLTError

__all__ = [
    "CONTROL_FALLBACK",
    "GOOD_SCORE",
    "INFORMATIVE_MARGIN",
    "SCORERS",
    "DetectionScore",
    "FeatureScore",
    "auroc",
    "check_scorer",
    "detection_score",
    "explainer_evidence",
    "judged_items",
    "list_detection_score",
    "pick_control",
    "question",
    "score_store",
    "score_with_control",
    "spread",
    "summarize",
    "token_items",
    "unscored",
    "verdict",
]

GOOD_SCORE = 0.7  # the summary reports the share of features scoring at least this
INFORMATIVE_MARGIN = 0.1  # mean score - mean control below this: the scorer is uninformative
BEATS_CONTROL = 0.2  # the summary reports the share of features whose score beats their control by this
CONTROL_FALLBACK = "dates and numbers in a list"  # the control when no other feature has an explanation
SHARE_GOOD = f"share_ge_{GOOD_SCORE}"
SCORERS = ("context", "token")
TOP_TOKENS = 10  # tokens counted in an explainer's `top_tokens` (as the feature database stores them)


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


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(a random positive scores above a random negative), ties counted half; NaN if a side is empty."""
    if not positive or not negative:
        return math.nan
    ranked = sorted([(s, 1) for s in positive] + [(s, 0) for s in negative])
    rank_sum, i = 0.0, 0
    while i < len(ranked):  # average ranks (1-based) over runs of ties
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        rank_sum += sum(label for _, label in ranked[i:j]) * (i + j + 1) / 2
        i = j
    n_pos, n_neg = len(positive), len(negative)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def check_scorer(scorer: str) -> None:
    """A CLTError naming `scorer` unless it is one of SCORERS."""
    if scorer not in SCORERS:
        raise CLTError(f"scorer={scorer!r}: use one of {', '.join(SCORERS)} (docs/quality.md, 'Feature labels').")


def unscored(examples: Sequence[Example], n: int) -> list[Example]:
    """The firing contexts `spread(examples, n)` leaves out: what the explainer may read (it never
    sees the contexts its label is scored on)."""
    scored = {id(e) for e in spread(examples, n)}
    return [e for e in examples if id(e) not in scored]


def explainer_evidence(evidence: FeatureEvidence, half: int) -> FeatureEvidence:
    """What an explainer may read of a feature scored with `half` firing and `half` silent contexts:
    its top contexts, the firing contexts the scorer leaves out (`unscored`), the silent ones after
    the scorer's, and `top_tokens` counted over those contexts alone (the token where each peaks)."""
    rest = unscored(evidence.activating, half)
    peaks = Counter(e.tokens[e.acts.index(e.max_act)] for e in [*evidence.top_examples, *rest] if e.max_act > 0)
    top_tokens = peaks.most_common(TOP_TOKENS)
    return replace(evidence, activating=rest, non_activating=evidence.non_activating[half:], top_tokens=top_tokens)


def spread(examples: Sequence[Example], n: int) -> list[Example]:
    """At most `n` of `examples` at evenly spaced ranks of their peak activation (strongest first),
    so a uniform sample's quantiles are all represented."""
    ordered = sorted(examples, key=lambda e: -e.max_act)
    if len(ordered) <= n:
        return ordered
    return [ordered[round(i * (len(ordered) - 1) / max(n - 1, 1))] for i in range(n)]


@dataclass(frozen=True)
class FeatureScore:
    """An explanation's AUROC and its control's (another feature's explanation, same contexts)."""

    score: float
    control: float
    true_positive_rate: float  # of the explanation, at P(yes) > 0.5
    true_negative_rate: float
    n_firing: int
    n_silent: int

    @property
    def difference(self) -> float:
        return self.score - self.control


def token_items(
    firing: Sequence[Example], silent: Sequence[Example], seed: int
) -> tuple[list[tuple[Example, int]], list[tuple[Example, int]]]:
    """The token scorer's (context, marked position) pairs: each firing context at its peak
    (positives); each context, firing then silent, at one seeded position where the feature is 0
    (negatives; none from a context without one)."""
    rng = random.Random(seed)
    positives = [(e, max(range(len(e.acts)), key=e.acts.__getitem__)) for e in firing if e.max_act > 0]
    negatives = []
    for example in [*firing, *silent]:
        zeros = [i for i, act in enumerate(example.acts) if act <= 0]
        if zeros:
            negatives.append((example, rng.choice(zeros)))
    return positives, negatives


def judged_items(
    firing: Sequence[Example], silent: Sequence[Example], scorer: str = "context", seed: int = 0
) -> tuple[list[tuple[Example, int | None]], int]:
    """What `scorer` asks about: (context, marked position; None for the context scorer) pairs,
    positives first, and how many positives."""
    if scorer == "token":
        positives, negatives = token_items(firing, silent, seed)
        return [*positives, *negatives], len(positives)
    return [(e, None) for e in [*firing, *silent]], len(firing)


def question(explanation: str, example: Example, at: int | None) -> list[dict[str, str]]:
    """The detection question of one judged item (`judged_items`)."""
    return detection_question(explanation, example) if at is None else token_question(explanation, example, at)


def score_with_control(
    explainer: Explainer,
    explanation: str,
    control: str,
    firing: Sequence[Example],
    silent: Sequence[Example],
    scorer: str = "context",
    seed: int = 0,
) -> FeatureScore:
    """One judge call: every item of `scorer` (`judged_items`) asked about `explanation` and about
    `control`; NaN scores (and no call) without both positives and negatives."""
    items, n_pos = judged_items(firing, silent, scorer, seed)
    n = len(items)
    if not n_pos or n_pos == n:
        return FeatureScore(math.nan, math.nan, math.nan, math.nan, n_pos, n - n_pos)
    p = explainer.judge([question(text, example, at) for text in (explanation, control) for example, at in items])
    mine, theirs = p[:n], p[n:]
    rates = DetectionScore.from_judgements([i < n_pos for i in range(n)], [s > 0.5 for s in mine])
    return FeatureScore(
        auroc(mine[:n_pos], mine[n_pos:]),
        auroc(theirs[:n_pos], theirs[n_pos:]),
        rates.true_positive_rate,
        rates.true_negative_rate,
        n_pos,
        n - n_pos,
    )


def pick_control(key: tuple[int, int], explanations: Mapping[tuple[int, int], str], seed: int) -> str:
    """Another feature's explanation (seeded choice among those with a different text), else
    CONTROL_FALLBACK."""
    own = explanations.get(key, "").strip().lower()
    others = sorted(t for k, t in explanations.items() if k != key and t and t.strip().lower() != own)
    if not others:
        return CONTROL_FALLBACK
    return random.Random(seed * 1_000_003 + key[0] * 100_003 + key[1]).choice(others)


def verdict(scores: Sequence[float | None], controls: Sequence[float | None]) -> dict[str, Any]:
    """Mean score, mean control, their difference, the share of features beating their control by
    BEATS_CONTROL, and whether the scorer is informative: the mean paired difference is at least
    INFORMATIVE_MARGIN and two standard errors."""
    pairs = [
        (float(s), float(c))
        for s, c in zip(scores, controls, strict=True)
        if s is not None and c is not None and not math.isnan(s) and not math.isnan(c)
    ]
    if not pairs:
        return {"pairs": 0, "informative": False, "message": "no feature could be scored against a control"}
    diffs = [s - c for s, c in pairs]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1))
    stderr = sd / math.sqrt(len(diffs))
    informative = mean >= INFORMATIVE_MARGIN and mean >= 2 * stderr
    out: dict[str, Any] = {
        "pairs": len(pairs),
        "mean_score": sum(s for s, _ in pairs) / len(pairs),
        "mean_control": sum(c for _, c in pairs) / len(pairs),
        "mean_difference": mean,
        "difference_stderr": stderr,
        f"share_beats_control_by_{BEATS_CONTROL}": sum(d >= BEATS_CONTROL for d in diffs) / len(diffs),
        "informative": informative,
    }
    if not informative:
        out["message"] = (
            f"UNINFORMATIVE SCORER: mean score {out['mean_score']:.3f} does not clearly beat the mean control "
            f"{out['mean_control']:.3f} (difference {mean:.3f} +- {stderr:.3f}, needs >= {INFORMATIVE_MARGIN} and "
            "2 standard errors): these scores cannot tell a good label from another feature's."
        )
    return out


def score_store(store: FeatureStore, judge: Explainer, half: int, seed: int, scorer: str = "context") -> None:
    """Score every explained feature of `store` with `scorer` (module docstring): `half` firing
    contexts spread over its activations and `half` silent ones, with its explanation and with a
    control (`pick_control`)."""
    check_scorer(scorer)
    explanations = store.explanations()
    for layer, feature in tqdm(store.with_status("explained"), desc="scoring", unit="feature"):
        evidence = store.evidence(layer, feature)
        control = pick_control((layer, feature), explanations, seed)
        firing, silent = spread(evidence.activating, half), evidence.non_activating[:half]
        item_seed = seed * 1_000_003 + layer * 100_003 + feature
        result = score_with_control(judge, explanations[layer, feature], control, firing, silent, scorer, item_seed)
        store.set_score(
            layer, feature, result.score, result.true_positive_rate, result.true_negative_rate, result.control
        )


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
