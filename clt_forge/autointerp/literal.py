"""`explainer.judge=literal`: detection questions answered from what the explanation literally claims.

An explanation that quotes the tokens its feature fires on ('"not" (19/20 top contexts), after
"do"', 'the word "king"') or names a word class of the tokens explainer ("newlines", "numbers")
makes a claim the text itself can confirm: P(yes) grows with the number of the text's tokens
(the judge model's tokenizer, compared stripped and lower-cased, as tokens.py counts them) that
the claim names, n / (n + 0.5) (0 when none, 0.67 for one, 0.8 for two). Explanations with no such
claim ("words about royalty") go to the model judge `FALLBACK` (the local PMI judge), and so do
prompts that are not detection questions. (As `explainer.kind=literal` the fallback also writes the
explanations: the local model's labels, judged literally.)

What counts as the claim: the tokens the explanation quotes before "; promotes" (what the decoder
writes is not where the feature fires), its ', after "X" (n/m)' part left out (the preceding
token is where it fires from, not on); so the tokens explainer's "typical" tokens count too. A
"punctuation:" or "capitalised words:" label claims the members it quotes (nearly every context
holds some punctuation or a capital, so the class itself tells nothing apart), a "numbers" /
"newlines" label the class (and any token it quotes).

Token questions (the token scorer, `prompts.token_question`: one marked token) are answered from the
same claim on that token alone: P(yes) = 1 when the claim names it and the label's ", after "X""
(if any) holds for the token before it, 0.75 when only the token matches, 0. A dense feature's
label ends its claim with '; fires on 35% of tokens, not on "the" (n/m silent), ...' (tokens.py):
there a token named neither firing nor silent gets DENSE_OTHER (0.5) and one named silent 0, since
such a feature fires on most tokens. (Whole-context questions read only the firing part.)

Why: on planted features of the embedded model (one word, a punctuation class, newlines) the PMI
judge ranked the true label's firing contexts above the silent ones barely better than another
feature's label (AUROC 0.61-0.67 vs control 0.55-0.63; docs/quality.md), while the claim these
labels make can be checked exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from clt_forge.autointerp.base import EXPLAINERS, Explainer, Messages
from clt_forge.autointerp.prompts import split_detection_question, split_token_question
from clt_forge.autointerp.tokens import DENSE_PART, WHOLE_CLASSES, quoted, token_key, word_class
from clt_forge.config.schema import ExplainerConfig

__all__ = ["DENSE_OTHER", "FALLBACK", "ONLY_TOKEN", "Claim", "LiteralJudge", "claim", "preceding"]

FALLBACK = "local"  # the model judge for explanations without a literal claim
COUNT_HALF = 0.5  # P(yes) = n / (n + COUNT_HALF) for n claimed tokens in the text
_AFTER = re.compile(r', after "([^"]+)"')
_AFTER_PART = re.compile(r', after "[^"]+"(?: \(\d+/\d+\))?')  # removed before reading the claim
ONLY_TOKEN = 0.75  # P(yes) of a token question whose token matches but not the claimed preceding token
DENSE_OTHER = 0.5  # P(yes) of a dense feature's token named neither firing nor silent


@dataclass(frozen=True)
class Claim:
    """The tokens (keys: stripped, lower-case) or the word class an explanation says its feature
    fires on; for a dense feature (`dense`), also the tokens it says the feature is silent on."""

    tokens: frozenset[str]
    word_class: str | None = None
    silent: frozenset[str] = frozenset()
    dense: bool = False

    def matches(self, token: str) -> bool:
        if self.word_class == "newlines" and "\n" in token:
            return True
        if self.word_class not in (None, "newlines") and word_class(token) == self.word_class:
            return True
        return token_key(token) in self.tokens

    def otherwise(self, token: str) -> float:
        """P(yes) for a token the claim does not name as firing: DENSE_OTHER for a dense feature's
        token not named silent, else 0."""
        return DENSE_OTHER if self.dense and token_key(token) not in self.silent else 0.0


def _keys(text: str) -> frozenset[str]:
    names = [q.replace("\\n", "\n") for q in quoted(text)]
    return frozenset(token_key(n) for n in names if n.strip() or "\n" in n)


def claim(explanation: str) -> Claim | None:
    """What `explanation` claims its feature fires on (module docstring); None: no literal claim."""
    core, dense, silent = _AFTER_PART.sub("", explanation.split("; promotes")[0]).strip().partition(DENSE_PART)
    keys = _keys(core)
    named_class = next((name for name in WHOLE_CLASSES if core.lower().startswith(name)), None)
    if named_class is None and not keys and not dense:
        return None  # a punctuation / capitals label without members: the model
    return Claim(keys, named_class, _keys(silent), bool(dense))


def preceding(explanation: str) -> str | None:
    """The token an explanation says its feature fires after (', after "X"'), as a key; None: no such claim."""
    core = explanation.split("; promotes")[0]
    match = _AFTER.search(core)
    return token_key(match[1].replace("\\n", "\n")) if match else None


@EXPLAINERS.register("literal")
class LiteralJudge(Explainer):
    """Judges detection questions by their explanation's literal claim (module docstring); the rest,
    and every `explain` prompt, go to the FALLBACK kind, built on first use. Tokenises with the
    tokenizer of `cfg.model` (the embedded model's by default, as the labels quote its tokens)."""

    def __init__(self, cfg: ExplainerConfig) -> None:
        self.cfg = cfg
        self._fallback: Explainer | None = None
        self._tokenizer: Any = None

    @property
    def fallback(self) -> Explainer:
        if self._fallback is None:
            self._fallback = EXPLAINERS.lookup(FALLBACK)(replace(self.cfg, kind=FALLBACK, judge=None))
        return self._fallback

    def _tokens(self) -> Callable[[str], list[str]]:
        """The text's tokens as the fallback model's tokenizer splits them (loaded alone: no model
        weights are read unless a question goes to the fallback)."""
        if self._tokenizer is None:
            from clt_forge.models.gguf import load_tokenizer
            from clt_forge.models.loading import model_config

            self._tokenizer = load_tokenizer(model_config(self.cfg.model))
        tokenizer = self._tokenizer
        return lambda text: [tokenizer.decode([i]) for i in tokenizer.encode(text, add_special_tokens=False)]

    def judge(self, questions: Sequence[Messages]) -> list[float]:
        scores: list[float | None] = [None] * len(questions)
        split = self._tokens()
        for i, question in enumerate(questions):
            token_parts = split_token_question(question)
            if token_parts is not None:
                scores[i] = self._token_score(*token_parts, split)
                continue
            parts = split_detection_question(question)
            said = claim(parts[0]) if parts else None
            if parts is not None and said is not None:
                n = sum(said.matches(token) for token in split(parts[1]))
                scores[i] = n / (n + COUNT_HALF)
        rest = [i for i, s in enumerate(scores) if s is None]
        if rest:
            for i, s in zip(rest, self.fallback.judge([questions[i] for i in rest]), strict=True):
                scores[i] = s
        return [float(s) for s in scores if s is not None]

    @staticmethod
    def _token_score(explanation: str, token: str, before: str, split: Callable[[str], list[str]]) -> float | None:
        """P(yes) of a token question (module docstring); None: no literal claim, the model judges."""
        said = claim(explanation)
        if said is None:
            return None
        if not said.matches(token):
            return said.otherwise(token)
        after = preceding(explanation)
        previous = split(before.rstrip(" \t"))[-1:] if after is not None and before.strip() else []
        return 1.0 if after is None or (previous and token_key(previous[0]) == after) else ONLY_TOKEN

    def explain(self, messages_batch: Sequence[Messages]) -> list[str]:
        return self.fallback.explain(messages_batch)

    def close(self) -> None:
        if self._fallback is not None:
            self._fallback.close()
            self._fallback = None
