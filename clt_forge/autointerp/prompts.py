"""The text of every prompt `clt autointerp` sends, and the parsing of what comes back (pure functions).

Messages are OpenAI-style chat messages: `[{"role": "system" | "user" | "assistant", "content": str}]`.

Explanation: `explanation_messages` shows the tokens the feature's decoder promotes, its top
examples with the strongest tokens wrapped in `<<` `>>` (activation >= HIGHLIGHT x the largest
activation shown) and the tokens it fires on most, after two worked examples (DEMOS), and asks for
a short phrase: the default local model, SmolLM2-135M-Instruct, is tiny, so the prompt is short.

Detection, two protocols over the same explanation:
- `detection_question`: one prompt per context, "does the feature fire on this text? yes or no".
  Each context is judged on its own, so an explainer can score it from log-probabilities (see
  explainers.py); `split_detection_question` recovers (explanation, text) from such a prompt.
- `detection_messages`: every context in one numbered list, answered with the numbers of the
  contexts it fires on (for capable OpenAI-compatible endpoints); `parse_detection` reads the answer.
- `token_question` (the token scorer): one context with one token in `<<` `>>`, "does the feature
  fire on the marked token?"; `split_token_question` recovers (explanation, token, preceding text).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from clt_forge.artifacts.features import Example, FeatureEvidence

__all__ = [
    "HIGHLIGHT",
    "clean_explanation",
    "context_text",
    "detection_messages",
    "detection_question",
    "explanation_messages",
    "highlight",
    "parse_detection",
    "render_prompt",
    "split_detection_question",
    "split_token_question",
    "token_question",
]

Message = dict[str, str]

HIGHLIGHT = 0.3  # tokens at or above this share of the largest shown activation are wrapped in << >>
MAX_LISTED = 8  # top tokens / decoder tokens shown
MAX_EXPLANATION_CHARS = 120

EXPLAIN_SYSTEM = "You explain what a feature of a language model detects. Answer with a short phrase only."
QUESTION_SYSTEM = "Answer yes or no."
QUESTION_END = "Does the feature fire on this text? Answer yes or no."
TOKEN_QUESTION_END = "Does the feature fire on the token in << >>? Answer yes or no."
LIST_SYSTEM = "You check an explanation of a language model feature against texts."


def context_text(example: Example) -> str:
    """The plain text of a context window (its tokens joined, no highlighting)."""
    return "".join(example.tokens).strip()


def highlight(example: Example, threshold: float) -> str:
    """The context on one line, runs of tokens with activation >= `threshold` wrapped in `<<` `>>`
    (a token's leading whitespace stays outside the brackets; newlines are shown as `\\n`)."""
    parts: list[str] = []
    inside = False
    for token, act in zip(example.tokens, example.acts, strict=True):
        token = token.replace("\n", "\\n")
        hot = act >= threshold and threshold > 0
        if hot and not inside:
            stripped = token.lstrip()
            parts.append(token[: len(token) - len(stripped)] + "<<" + stripped)
            inside = True
        elif not hot and inside:
            parts.append(">>" + token)
            inside = False
        else:
            parts.append(token)
    if inside:
        parts.append(">>")
    return "".join(parts).strip()


def _demo(
    texts: Sequence[str], hot: set[str], top_tokens: list[tuple[str, int]], top_logits: list[str]
) -> FeatureEvidence:
    examples = []
    for text in texts:
        tokens = re.findall(r" ?\w+|[^\w\s]", text)
        examples.append(Example(tokens, [1.0 if token.strip() in hot else 0.0 for token in tokens]))
    return FeatureEvidence(layer=-1, feature=-1, top_examples=examples, top_tokens=top_tokens, top_logits=top_logits)


# Worked examples shown before the real question: SmolLM2-135M answers in their form ('the word "king"')
# instead of rambling or copying a list. Measured on four planted features (a word, numbers, water,
# colours), the decoder tokens first and the top tokens last (a tiny model copies what it read last).
DEMOS = [
    (_demo(["I ate an apple today.", "The apple tree grew tall.", "She sliced the apples."], {"apple", "apples"},
           [(" apple", 9), (" apples", 2)], [" pie", " tree"]), 'the word "apple"'),
    (_demo(["He was born in Paris.", "We flew to Tokyo and Rome.", "London is large."], {"Paris", "Tokyo", "Rome", "London"},
           [(" Paris", 4), (" Tokyo", 3), (" London", 2)], [",", " in"]), "names of cities"),
]  # fmt: skip


def _evidence_text(evidence: FeatureEvidence, max_examples: int) -> str:
    examples = evidence.top_examples[:max_examples]
    peak = max((example.max_act for example in examples), default=0.0)
    lines = []
    if evidence.top_logits:
        listed = ", ".join(f'"{token.strip() or token}"' for token in evidence.top_logits[:MAX_LISTED])
        lines.append(f"Tokens the feature makes more likely next: {listed}")
    lines.append("Texts where the feature fires (strongest tokens in << >>):")
    lines += [f"{i}. {highlight(example, HIGHLIGHT * peak)}" for i, example in enumerate(examples, 1)]
    if evidence.top_tokens:
        listed = ", ".join(f'"{token.strip() or token}" ({count})' for token, count in evidence.top_tokens[:MAX_LISTED])
        lines.append(f"Tokens it fires on most: {listed}")
    lines.append("What does the feature detect? Answer with a short phrase.")
    return "\n".join(lines)


def explanation_messages(evidence: FeatureEvidence, max_examples: int = 8) -> list[Message]:
    """System, two worked examples (user / assistant turns), then the user message about this feature:
    its decoder's top tokens, its top examples with the strongest tokens in << >>, its top tokens."""
    messages = [{"role": "system", "content": EXPLAIN_SYSTEM}]
    for demo, answer in DEMOS:
        messages += [
            {"role": "user", "content": _evidence_text(demo, max_examples)},
            {"role": "assistant", "content": answer},
        ]
    messages.append({"role": "user", "content": _evidence_text(evidence, max_examples)})
    return messages


def render_prompt(messages: Sequence[Message]) -> str:
    """Messages as readable plain text (for `--dry-run`)."""
    return "\n\n".join(f"[{message['role']}]\n{message['content']}" for message in messages)


def detection_question(explanation: str, example: Example) -> list[Message]:
    """One context, one yes/no question (the form `split_detection_question` reads back)."""
    content = f"Explanation: {explanation}\nText: {context_text(example)}\n{QUESTION_END}"
    return [{"role": "system", "content": QUESTION_SYSTEM}, {"role": "user", "content": content}]


_QUESTION = re.compile(
    r"\AExplanation: (?P<explanation>[^\n]*)\nText: (?P<text>.*)\n" + re.escape(QUESTION_END) + r"\Z", re.S
)


def split_detection_question(messages: Sequence[Message]) -> tuple[str, str] | None:
    """(explanation, text) of a `detection_question` prompt; None for any other prompt."""
    if not messages:
        return None
    match = _QUESTION.match(messages[-1].get("content", ""))
    return (match["explanation"], match["text"]) if match else None


def marked_text(example: Example, position: int) -> str:
    """The context on one line (newlines as `\\n`) with the token at `position` in `<<` `>>` (its
    leading whitespace outside); `<<` / `>>` elsewhere in the text are spaced out, so the mark is the
    only one."""
    parts = []
    for i, token in enumerate(example.tokens):
        token = token.replace("\n", "\\n").replace("<<", "< <").replace(">>", "> >")
        if i == position:
            stripped = token.lstrip()
            token = token[: len(token) - len(stripped)] + "<<" + stripped + ">>"
        parts.append(token)
    return "".join(parts).strip()


def token_question(explanation: str, example: Example, position: int) -> list[Message]:
    """One context, one marked token, one yes/no question (the form `split_token_question` reads)."""
    content = f"Explanation: {explanation}\nText: {marked_text(example, position)}\n{TOKEN_QUESTION_END}"
    return [{"role": "system", "content": QUESTION_SYSTEM}, {"role": "user", "content": content}]


_TOKEN_QUESTION = re.compile(
    r"\AExplanation: (?P<explanation>[^\n]*)\nText: (?P<before>[^\n]*?)<<(?P<token>[^\n]*?)>>[^\n]*\n"
    + re.escape(TOKEN_QUESTION_END)
    + r"\Z"
)


def split_token_question(messages: Sequence[Message]) -> tuple[str, str, str] | None:
    """(explanation, marked token, text before it) of a `token_question` prompt, newlines restored;
    None for any other prompt."""
    if not messages:
        return None
    match = _TOKEN_QUESTION.match(messages[-1].get("content", ""))
    if not match:
        return None
    restore = lambda text: text.replace("\\n", "\n")  # noqa: E731
    return match["explanation"], restore(match["token"]), restore(match["before"])


def detection_messages(explanation: str, examples: Sequence[Example]) -> list[Message]:
    """Every context in one numbered list (no highlighting); the answer is read by `parse_detection`."""
    texts = "\n".join(f"{i}. {context_text(example).replace(chr(10), ' ')}" for i, example in enumerate(examples, 1))
    content = (
        f"Explanation of the feature: {explanation}\n\nTexts:\n{texts}\n\n"
        "On which texts does the feature fire? Answer with their numbers separated by commas "
        "(for example: 1, 3), or 'none'."
    )
    return [{"role": "system", "content": LIST_SYSTEM}, {"role": "user", "content": content}]


_VERDICT = re.compile(r"^\W*(?:text\s*)?(?:(\d+)\s*[.:)\-]\s*)?(yes|no|true|false)\b", re.I)
_RANGE_OR_NUMBER = re.compile(r"(\d+)\s*(?:-|–|to)\s*(\d+)|(\d+)")


def parse_detection(answer: str, n: int) -> list[bool]:
    """Which of `n` contexts the answer says the feature fires on. Accepted forms:

    - one verdict per line: "yes\\nno\\nyes", or numbered "1: yes\\n2. no\\nText 3) no" (the line's
      number says which context it answers; unnumbered lines are taken in order). A verdict is
      yes / no / true / false as the line's first word after the optional number; this form is
      chosen as soon as one line is a verdict, and other lines are then ignored;
    - otherwise numbers (1-based) anywhere in the text: "1, 3, 4", "[2,5]", "Texts 1 and 3", ranges
      "2-4"; numbers outside 1..n are ignored;
    - "none" (or no number at all): no context; "all" (and no number): every context.
    Contexts the answer does not mention are False.
    """
    fires = [False] * n
    verdicts = [match for line in answer.splitlines() if (match := _VERDICT.match(line.strip()))]
    if verdicts:
        position = 0
        for verdict in verdicts:
            index = int(verdict[1]) - 1 if verdict[1] else position
            if 0 <= index < n:
                fires[index] = verdict[2].lower() in ("yes", "true")
            position = index + 1
        return fires
    if re.search(r"\ball\b", answer, re.I) and not re.search(r"\d", answer):
        return [True] * n
    for match in _RANGE_OR_NUMBER.finditer(answer):
        low, high = (int(match[1]), int(match[2])) if match[1] else (int(match[3]), int(match[3]))
        for number in range(max(low, 1), min(high, n) + 1):
            fires[number - 1] = True
    return fires


_PREFIX = re.compile(
    r"^(?:explanation|answer|feature|label)\s*:\s*"
    r"|^(?:this|the)\s+feature\s+(?:detects|fires\s+on|responds\s+to|is\s+about|represents|encodes)\s*:?\s*",
    re.I,
)
_COUNTS = re.compile(r"\s*\(\d+\)")  # '"3" (4)': a count copied from the top-token list
_PAIRS = {('"', '"'), ("'", "'"), ("`", "`"), ("*", "*"), ("“", "”"), ("‘", "’")}


def _unwrap(text: str) -> str:
    """Without wrapping quotes / markdown emphasis, and without an unmatched quote at either end."""
    text = text.strip()
    while len(text) >= 2 and (text[0], text[-1]) in _PAIRS:
        text = text[1:-1].strip()
    for quote in ('"', "`", "“", "”"):
        if text.count(quote) == 1 and (text.startswith(quote) or text.endswith(quote)):
            text = text.strip(quote).strip()
    return text


def clean_explanation(text: str, max_chars: int = MAX_EXPLANATION_CHARS) -> str:
    """The first line with words in it, without labels ("Explanation:", "The feature detects"),
    wrapping quotes or a final period, cut at a word boundary to at most `max_chars` characters
    ("" when there is nothing)."""
    line = next((line for line in text.splitlines() if re.search(r"\w", line)), "")
    previous = None
    while previous != line:  # labels and quotes nest: 'Explanation: "The feature detects X."'
        previous = line
        line = _unwrap(_COUNTS.sub("", _PREFIX.sub("", _unwrap(line))).rstrip("."))
    if len(line) > max_chars:
        cut = line[:max_chars]
        line = cut[: cut.rfind(" ")] if " " in cut else cut
    return line.rstrip(" ,;:")
