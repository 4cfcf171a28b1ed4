"""`explainer=tokens`: a label read off the evidence, no language model (also the LLM kinds' fallback).

    "not" (19/20 top contexts), after "do" (12/20); typical: "no" (9/40 sampled), "never" (5/40); promotes "be"
    numbers: "1" (5/20), "2" (3/20), "12" (2/20)
    newlines (22/24 top contexts); promotes "And", "The"
    ";" (14/20 top contexts), "," (3/20); fires on 80% of tokens, not on "of" (45/781 silent), "I" (25/781)

From the feature's top contexts (the token where each peaks, and the token before it):
- the dominant activating tokens (case and leading space merged), each with its share of the top
  contexts, listed until they cover LISTED_SHARE of them (at most MAX_TOKENS);
- when no single token holds half the contexts but a word class does (CLASS_SHARE of them:
  numbers, newlines, punctuation, capitalised words), the class is named first; also when the
  top contexts are one member of a class but the tokens it fires on (top contexts and the
  uniform firing sample, `top_tokens`) are the class with no member holding half;
- the preceding token when one holds at least PRECEDING_SHARE of the contexts;
- "typical": the tokens it peaks on in its sampled firing contexts (`evidence.activating`: a uniform
  sample over all its activations, the scorer's held-out ones left out), those not named already,
  most common first, at most MAX_TYPICAL; a token is left out when its share of these peaks is no
  larger than its share of the positions where the feature is 0 (in those contexts and its silent
  ones): "the" or "," peaking now and then only because they are everywhere tell nothing apart;
  and when it is not in the top contexts (in_top_contexts), so a label names only what the
  feature's top contexts show. The top contexts show the strongest activations; most activations
  are weaker and often on other tokens: on the demo's graph features, naming them raised the token
  scorer's mean from 0.61 to 0.72, the distinctiveness rule to 0.755, and the top-contexts rule
  with the quote fix to 0.764 (docs/quality.md);
- for a dense feature (firing on DENSE_FREQUENCY of all tokens or more, `evidence.frequency`):
  "fires on 80% of tokens, not on ...": the tokens it is distinctively silent on, those whose share
  of the zero positions (sampled and silent contexts) most exceeds their share of the sampled peaks,
  at most MAX_SILENT. Such a feature fires weakly on nearly every token, so where it fires cannot
  be listed; where it stays silent can (the literal judge reads this part, literal.py);
- the decoder's top promoted tokens (what the feature writes), MAX_PROMOTED of them.
Every quoted token is in the feature's top contexts (in_top_contexts: one of their tokens or a whole
word of their text; labels.rejection refuses any label naming another) or is one its decoder promotes.

Detection questions (scoring) go to `explainer.judge` (default: literal, which checks the quoted
tokens / named class on the text and passes the rest to the local model).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

from clt_forge.artifacts.features import Example, FeatureEvidence
from clt_forge.autointerp.base import EXPLAINERS, Explainer, Messages
from clt_forge.config.schema import ExplainerConfig

__all__ = [
    "DENSE_PART",
    "WHOLE_CLASSES",
    "TokensExplainer",
    "in_top_contexts",
    "quoted",
    "token_key",
    "tokens_label",
    "top_context_check",
    "word_class",
]

LISTED_SHARE = 0.8  # list dominant tokens until they cover this share of the top contexts
MAX_TOKENS = 3
MIN_TOKEN_SHARE = 0.1  # a token below this share of the top contexts is not listed
CLASS_SHARE = 0.6  # a word class holding this share of the top contexts is named
PRECEDING_SHARE = 0.5  # a preceding token holding this share is named
MAX_PROMOTED = 3
MAX_TYPICAL = 12  # sampled firing tokens named at most ("typical")
DENSE_FREQUENCY = 0.2  # a feature firing on this share of all tokens is also labelled by where it is silent
MAX_SILENT = 12  # tokens a dense feature's label names as silent, at most
DENSE_PART = "; fires on "  # starts a dense feature's silent part (literal.claim reads it)
WHOLE_CLASSES = ("newlines", "numbers")  # classes a label claims whole (a context can lack them, unlike punctuation)
_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')
DEFAULT_JUDGE = "literal"  # literal claims checked on the text, the rest judged by local (literal.py)

CLASSES: list[tuple[str, Callable[[str], bool]]] = [
    ("newlines", lambda t: "\n" in t),
    ("numbers", lambda t: t.strip().replace(",", "").replace(".", "").isdigit()),
    ("punctuation", lambda t: bool(t.strip()) and not any(c.isalnum() for c in t)),
    ("capitalised words", lambda t: t.strip()[:1].isupper() and t.strip().isalpha()),
]


def word_class(token: str) -> str | None:
    """The first class of CLASSES the token belongs to (None: an ordinary word piece)."""
    return next((name for name, member in CLASSES if member(token)), None)


def _shown(token: str) -> str:
    """How a token is quoted in a label: stripped, newlines as \\n."""
    return token.replace("\n", "\\n").strip() or repr(token)


def _quote(form: str) -> str:
    """A token as a label quotes it: "form", or “form” when it holds a straight quote (quoted() reads both)."""
    return f"“{form}”" if '"' in form else f'"{form}"'


def token_key(token: str) -> str:
    """How tokens are compared: stripped and lower-cased; whitespace-only tokens keep their newlines
    and tabs (" \\n" is "\\n", as labels show both) and a run of spaces stays as it is."""
    return token.strip().lower() if token.strip() else token.strip(" ") or token


def quoted(label: str) -> list[str]:
    """The strings a label quotes ("..." or “...”), as written (\\n for a newline)."""
    return [a or b for a, b in _QUOTED.findall(label)]


def _peaks(examples: Sequence[Example]) -> list[tuple[str, str | None]]:
    """(token at the peak activation, the token before it) of each context that fired."""
    out = []
    for example in examples:
        if not example.acts or max(example.acts) <= 0:
            continue
        peak = max(range(len(example.acts)), key=example.acts.__getitem__)
        out.append((example.tokens[peak], example.tokens[peak - 1] if peak > 0 else None))
    return out


def _counted(tokens: Sequence[str]) -> list[tuple[str, int]]:
    """(display form, count), most common first; case / leading-space variants merged."""
    counts = Counter(token_key(t) for t in tokens)
    forms: dict[str, Counter[str]] = {}
    for t in tokens:
        forms.setdefault(token_key(t), Counter())[_shown(t)] += 1
    return [(forms[k].most_common(1)[0][0], c) for k, c in counts.most_common()]


def in_top_contexts(name: str, evidence: FeatureEvidence) -> bool:
    """Whether `name` (quoted in a label) is in the feature's top contexts or is a token its decoder
    promotes: what a label may name (labels.rejection refuses the rest). It is there when it is one
    of their tokens (compared by token_key), or a run of their text not cut out of a longer word:
    "no" is not found in "not", a multi-token word such as "baths" is found in " b" + "aths"."""
    return top_context_check(evidence)(name)


def top_context_check(evidence: FeatureEvidence) -> Callable[[str], bool]:
    """`in_top_contexts` for one feature, its tokens and text read once for every name asked."""
    promoted = {token_key(t) for t in evidence.top_logits}
    keys = {token_key(t) for e in evidence.top_examples for t in e.tokens}
    text = " ".join("".join(e.tokens) for e in evidence.top_examples).lower()

    def check(name: str) -> bool:
        whitespace = re.fullmatch(r"'(\s+)'", name)  # how _shown quotes a whitespace-only token
        needle = whitespace.group(1) if whitespace else name.replace("\\n", "\n").strip(" ")
        key = token_key(needle)
        if not needle or key in promoted:
            return True
        if key in keys or whitespace:  # a whitespace-only token is there only as a token
            return key in keys
        pattern = re.escape(needle.lower())
        word_start, word_end = needle[0].isalnum(), needle[-1].isalnum()
        pattern = (r"(?<![^\W_])" if word_start else "") + pattern + (r"(?![^\W_])" if word_end else "")
        return re.search(pattern, text) is not None

    return check


def tokens_label(evidence: FeatureEvidence) -> str:
    """The evidence-only label (module docstring); "" when the feature never fired."""
    peaks = _peaks(evidence.top_examples)
    n = len(peaks)
    if not n:
        return ""
    shown = top_context_check(evidence)
    counted = _counted([token for token, _ in peaks])
    listed, covered = [], 0
    for form, count in counted[:MAX_TOKENS]:
        if count / n < MIN_TOKEN_SHARE or covered / n >= LISTED_SHARE:
            break
        listed.append((form, count))
        covered += count
    classes = Counter(word_class(token) for token, _ in peaks)
    name, members = max(((c, k) for c, k in classes.items() if c), key=lambda x: x[1], default=(None, 0))
    broad = _broad_class(evidence.top_tokens, name, shown) if name and members / n >= CLASS_SHARE else None
    if name == "newlines" and members / n >= CLASS_SHARE:
        core = f"newlines ({members}/{n} top contexts)"
    elif name and members / n >= CLASS_SHARE and counted[0][1] / n < 0.5:
        in_class = [(form, c) for form, c in counted if word_class(form) == name][:MAX_TOKENS]
        core = f"{name}: " + ", ".join(f"{_quote(form)} ({c}/{n})" for form, c in in_class)
    elif broad:
        core = f"{name}: " + ", ".join(f"{_quote(form)} ({c}/{broad[1]} sampled)" for form, c in broad[0])
    elif listed:
        first, *rest = listed
        core = f"{_quote(first[0])} ({first[1]}/{n} top contexts)" + "".join(
            f", {_quote(f)} ({c}/{n})" for f, c in rest
        )
    else:
        core = "various tokens: " + ", ".join(_quote(form) for form, _ in counted[:MAX_TOKENS])
    before = _counted([b for _, b in peaks if b is not None])
    after = (
        f", after {_quote(before[0][0])} ({before[0][1]}/{n})" if before and before[0][1] / n >= PRECEDING_SHARE else ""
    )
    typical = _typical(evidence.activating, evidence.non_activating, core + after, shown)
    if evidence.frequency >= DENSE_FREQUENCY:  # the tokens it fires after may be ones it is silent on
        typical += _dense(evidence.activating, evidence.non_activating, core + typical, shown, evidence.frequency)
    core += after + typical
    promoted = [_shown(t) for t in evidence.top_logits if t.strip()][:MAX_PROMOTED]
    if promoted:
        core += "; promotes " + ", ".join(_quote(t) for t in promoted)
    return core


def _typical(sampled: Sequence[Example], silent: Sequence[Example], named: str, shown: Callable[[str], bool]) -> str:
    """The "typical" part of a label (module docstring); "" when no distinctive token is left to name."""
    tokens = [token for token, _ in _peaks(sampled)]
    already = {token_key(q.replace("\\n", "\n")) for q in quoted(named)}
    classes = _named_classes(named)
    covered = [t for t in tokens if token_key(t) in already or word_class(t) in classes]
    listed: list[str] = []
    total = len(tokens)
    zero = _zero_shares([*sampled, *silent])
    for form, count in _counted([t for t in tokens if t not in covered]):
        if len(listed) >= MAX_TYPICAL:
            break
        if not shown(form) or count / total <= zero.get(token_key(form.replace("\\n", "\n")), 0.0):
            continue  # as common where it is silent as where it peaks: naming it tells nothing apart
        listed.append(f"{_quote(form)} ({count}/{total}" + (" sampled)" if not listed else ")"))
    return "; typical: " + ", ".join(listed) if listed else ""


def _dense(
    sampled: Sequence[Example], silent: Sequence[Example], named: str, shown: Callable[[str], bool], frequency: float
) -> str:
    """The "dense" part of the label of a feature that fires on `frequency` >= DENSE_FREQUENCY of all
    tokens (module docstring): the tokens it is distinctively silent on. "" when none is left."""
    peaks = Counter(token_key(token) for token, _ in _peaks(sampled))
    n_peaks = sum(peaks.values()) or 1
    zeros = [t for e in [*sampled, *silent] for t, a in zip(e.tokens, e.acts, strict=False) if a <= 0]
    already = {token_key(q.replace("\\n", "\n")) for q in quoted(named)}
    gains = []  # a silent token's share of the zero positions minus its share of the peaks
    for form, count in _counted(zeros):
        key = token_key(form.replace("\\n", "\n"))
        gain = count / len(zeros) - peaks.get(key, 0) / n_peaks
        if gain > 0 and key not in already and shown(form):
            gains.append((gain, form, count))
    listed = [(form, count) for _, form, count in sorted(gains, key=lambda g: -g[0])[:MAX_SILENT]]
    if not listed:
        return ""
    first, *rest = listed
    return (
        f"{DENSE_PART}{frequency:.0%} of tokens, not on {_quote(first[0])} ({first[1]}/{len(zeros)} silent)"
        + "".join(f", {_quote(form)} ({count}/{len(zeros)})" for form, count in rest)
    )


def _zero_shares(examples: Sequence[Example]) -> dict[str, float]:
    """Each token's share (by key) of the positions where the feature is 0 in `examples`."""
    counts = Counter(token_key(t) for e in examples for t, a in zip(e.tokens, e.acts, strict=False) if a <= 0)
    total = sum(counts.values())
    return {key: c / total for key, c in counts.items()} if total else {}


def _named_classes(label: str) -> set[str]:
    """The classes a label claims as a whole (newlines, numbers): their members need no naming."""
    return {name for name in WHOLE_CLASSES if label.startswith(name)}


def _broad_class(
    top_tokens: Sequence[tuple[str, int]], name: str, shown: Callable[[str], bool]
) -> tuple[list[tuple[str, int]], int] | None:
    """The class `name`'s tokens among the tokens the feature fired on (`top_tokens`: top contexts
    and the uniform firing sample, counted), when the class holds CLASS_SHARE of them and no one
    token half: a class feature whose strongest activations happen to favour one member. Only the
    members `shown` accepts (found in the top contexts) are named; None when that leaves none."""
    counted = _counted([t for t, c in top_tokens for _ in range(c)])
    total = sum(c for _, c in counted)
    in_class = [(form, c) for form, c in counted if word_class(form) == name]
    if not total or sum(c for _, c in in_class) / total < CLASS_SHARE or counted[0][1] / total >= 0.5:
        return None
    named = [(form, c) for form, c in in_class if shown(_shown(form))][:MAX_TOKENS]
    return (named, total) if named else None


@EXPLAINERS.register("tokens")
class TokensExplainer(Explainer):
    """Labels from the evidence alone; prompts (detection questions, lists) go to the judge kind
    `cfg.judge` (default local), built on first use."""

    def __init__(self, cfg: ExplainerConfig) -> None:
        self.cfg = cfg
        self._judge: Explainer | None = None

    @property
    def judge_model(self) -> Explainer:
        if self._judge is None:
            kind = self.cfg.judge or DEFAULT_JUDGE
            self._judge = EXPLAINERS.lookup(kind)(replace(self.cfg, kind=kind, judge=None))
        return self._judge

    def describe(self, evidence: Sequence[FeatureEvidence], candidates: int = 1) -> list[list[str]]:
        return [[tokens_label(e)] for e in evidence]

    def explain(self, messages_batch: Sequence[Messages]) -> list[str]:
        return self.judge_model.explain(messages_batch)

    def judge(self, questions: Sequence[Messages]) -> list[float]:
        return self.judge_model.judge(questions)

    def close(self) -> None:
        if self._judge is not None:
            self._judge.close()
            self._judge = None
