"""Choosing each feature's label: candidates, rejection rules, the tokens fallback, best score.

    labels = choose_labels(explainer, judge, evidence, candidates=3, silent=[...])

1. the explainer's candidates (`Explainer.describe`: the LLM kinds give `candidates` answers);
2. an answer is rejected (`rejection`) when it is empty, repeats itself ("the feature of the
   feature of ..."), copies the prompt's worked examples (prompts.DEMOS: a word of theirs that the
   feature's top contexts lack), or quotes a token that is neither in the feature's top contexts nor
   among its decoder's promoted tokens;
3. no acceptable answer: the evidence-only label (tokens.py) is used instead;
4. several: each is judged on the explainer's own evidence (the top contexts against silent
   contexts kept apart from the scorer's: `silent`), and the highest AUROC is kept. Selection never
   sees the held-out contexts the reported score is computed on.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from clt_forge.artifacts.features import Example, FeatureEvidence, FeatureStore
from clt_forge.autointerp.explainers import Explainer
from clt_forge.autointerp.prompts import DEMOS
from clt_forge.autointerp.scoring import auroc, judged_items, question
from clt_forge.autointerp.tokens import quoted, tokens_label, top_context_check

__all__ = ["LabelChoice", "choose_labels", "naming_absent_tokens", "quoted", "rejection"]

SELECT_FIRING = 10  # top contexts judged per candidate
SELECT_SILENT = 10  # silent contexts judged per candidate (collected beyond the scorer's)
_STOP = {"the", "word", "words", "names", "name", "of", "a", "an", "and", "in", "token", "tokens"}


def _demo_words() -> set[str]:
    words: set[str] = set()
    for demo, answer in DEMOS:
        words |= set(re.findall(r"[a-z]+", answer.lower()))
        words |= {token.strip().lower() for token, _ in demo.top_tokens}
    return words - _STOP


DEMO_WORDS = _demo_words()


def rejection(label: str, evidence: FeatureEvidence) -> str | None:
    """Why `label` is not acceptable for this feature (None: acceptable)."""
    if not label.strip():
        return "empty"
    words = re.findall(r"[a-z]+", label.lower())
    if any(c >= 2 for c in Counter(pairwise(words)).values()) or (len(words) >= 6 and len(set(words)) < len(words) / 2):
        return "repeats itself"
    text = " ".join("".join(e.tokens) for e in evidence.top_examples).lower()
    copied = [w for w in words if w in DEMO_WORDS and w not in text]
    if copied:
        return f'copies the worked examples ("{copied[0]}")'
    shown = top_context_check(evidence)
    for name in quoted(label):
        if not shown(name):
            return f'names "{name}", absent from the top contexts'
    return None


def naming_absent_tokens(store: FeatureStore, keys: Sequence[tuple[int, int]] | None = None) -> list[str]:
    """The features ("layer/feature"; all explained ones, or `keys`) whose label quotes a token
    absent from their top contexts (tokens.in_top_contexts): what `rejection` refuses."""
    labels = store.explanations()
    out = []
    for key in labels if keys is None else keys:
        names = quoted(labels.get(key) or "")
        if names and not all(map(top_context_check(store.evidence(*key)), names)):
            out.append(f"{key[0]}/{key[1]}")
    return out


@dataclass
class LabelChoice:
    label: str
    candidates: int  # answers the explainer gave
    rejected: dict[str, str] = field(default_factory=dict)  # answer -> why
    fallback: bool = False  # the tokens label replaced every rejected answer


def choose_labels(
    explainer: Explainer,
    judge: Explainer,
    evidence: Sequence[FeatureEvidence],
    candidates: int,
    silent: Sequence[Sequence[Example]],
    scorer: str = "context",
) -> list[LabelChoice]:
    """One label per feature (module docstring); `silent[i]`: feature i's selection silent contexts;
    candidates are compared with `scorer`'s questions (scoring.py)."""
    choices = []
    for e, answers in zip(evidence, explainer.describe(evidence, candidates), strict=True):
        rejected = {a: why for a in answers if (why := rejection(a, e))}
        kept = [a for a in answers if a not in rejected]
        choice = LabelChoice(kept[0] if kept else tokens_label(e), len(answers), rejected, not kept)
        choices.append((choice, kept))
    _select([c for c, _ in choices], [k for _, k in choices], judge, evidence, silent, scorer)
    return [c for c, _ in choices]


def _select(
    choices: list[LabelChoice],
    kept: list[list[str]],
    judge: Explainer,
    evidence: Sequence[FeatureEvidence],
    silent: Sequence[Sequence[Example]],
    scorer: str,
) -> None:
    """Where several answers are acceptable, the one with the best AUROC on the selection contexts."""
    jobs = []  # (feature, candidates, judged items, positives)
    for i, answers in enumerate(kept):
        firing, quiet = evidence[i].top_examples[:SELECT_FIRING], list(silent[i])[:SELECT_SILENT]
        items, n_pos = judged_items(firing, quiet, scorer)
        if len(answers) > 1 and 0 < n_pos < len(items):
            jobs.append((i, answers, items, n_pos))
    questions = [question(a, x, at) for _, answers, items, _ in jobs for a in answers for x, at in items]
    if not questions:
        return
    p = iter(judge.judge(questions))
    for i, answers, items, n_pos in jobs:
        best, best_auc = answers[0], -1.0
        for answer in answers:
            scores = [next(p) for _ in items]
            auc = auroc(scores[:n_pos], scores[n_pos:])
            if auc > best_auc:
                best, best_auc = answer, auc
        choices[i].label = best
