"""Explainers, prompts and detection scoring (clt_forge/autointerp/{prompts,explainers,scoring}.py).

The OpenAI-compatible path runs against a real HTTP server on 127.0.0.1 (tests/openai_server.py)
through the real `openai` client; the local path runs the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import math
import re
import socket
from collections.abc import Sequence

import pytest
from openai_server import FakeOpenAIServer, mentions

from clt_forge.artifacts.features import Example, FeatureEvidence
from clt_forge.autointerp.explainers import EXPLAINERS, NO_EXPLAINER, Explainer, OpenAIExplainer, make_explainer
from clt_forge.autointerp.prompts import (
    clean_explanation,
    detection_messages,
    detection_question,
    explanation_messages,
    parse_detection,
    render_prompt,
    split_detection_question,
)
from clt_forge.autointerp.scoring import detection_score, list_detection_score, summarize
from clt_forge.config.schema import ExplainerConfig
from clt_forge.errors import CLTError


def example(text: str, hot: Sequence[str] = (), act: float = 4.0) -> Example:
    """Tokens split GPT-style (leading spaces kept); words in `hot` get activation `act`."""
    tokens = re.findall(r" ?\w+|[^\w\s]", text)
    return Example(tokens, [act if token.strip() in hot else 0.0 for token in tokens])


KING = [
    example("The king sat on the throne.", ["king"]),
    example("Long live the king!", ["king"]),
    example("The old king and his queen ruled the land.", ["king"]),
    example("A wise king listens to his people.", ["king"]),
]
SILENT = [
    example("The dog ran in the park."),
    example("She bought bread at the market."),
    example("Rain fell on the quiet town."),
    example("He fixed the old bicycle."),
]


def king_evidence() -> FeatureEvidence:
    return FeatureEvidence(
        layer=3,
        feature=7,
        top_examples=KING,
        top_tokens=[(" king", 12), (" King", 3)],
        activating=[
            example("The king of France visited Spain.", ["king"]),
            example("Every king needs a crown.", ["king"]),
        ],
        non_activating=SILENT[:2],
        top_logits=[" throne", " crown"],
    )


# ---- prompts -----------------------------------------------------------------------------------


def test_explanation_prompt_highlights_exactly_the_high_activation_tokens():
    evidence = FeatureEvidence(
        layer=0,
        feature=1,
        top_examples=[
            # peak 10 over the shown examples: threshold 3.0 (0.3 x 10); 2.9 stays plain, 3.0 is marked
            Example(["The", " king", " sat", " on", " the", " throne"], [0.0, 10.0, 2.9, 3.0, 0.0, 3.5]),
            Example(["New", " York", " City", "\n"], [5.0, 5.0, 0.0, 4.0]),  # a run is one span
            Example(["quiet", " words"], [1.0, 2.0]),  # below 0.3 x the feature's peak: nothing marked
            Example(["never", " shown"], [9.0, 9.0]),
        ],
        top_tokens=[(" king", 12), (" York", 3)],
        top_logits=[" throne"],
    )
    messages = explanation_messages(evidence, max_examples=3)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    lines = messages[-1]["content"].splitlines()
    assert lines[0] == 'Tokens the feature makes more likely next: "throne"'
    assert lines[2:5] == ["1. The <<king>> sat <<on>> the <<throne>>", "2. <<New York>> City<<\\n>>", "3. quiet words"]
    assert lines[5] == 'Tokens it fires on most: "king" (12), "York" (3)'
    assert "never" not in messages[-1]["content"]  # max_examples
    assert sum(line.count("<<") for line in lines[2:5]) == 5
    assert "answer with a short phrase" in messages[-1]["content"].lower()
    rendered = render_prompt(messages)
    assert rendered.startswith("[system]\n") and '[assistant]\nthe word "apple"' in rendered

    no_logits = FeatureEvidence(layer=0, feature=1, top_examples=KING[:1])
    content = explanation_messages(no_logits)[-1]["content"]
    assert "more likely next" not in content and "fires on most" not in content
    assert "1. The <<king>> sat on the throne." in content


def test_detection_prompts_hide_activations_and_round_trip():
    question = detection_question("the word king", KING[0])
    assert "<<" not in question[-1]["content"]
    assert question[-1]["content"].endswith("Answer yes or no.")
    assert split_detection_question(question) == ("the word king", "The king sat on the throne.")
    assert split_detection_question(explanation_messages(king_evidence())) is None

    listed = detection_messages("the word king", [KING[0], SILENT[0]])[-1]["content"]
    assert "1. The king sat on the throne.\n2. The dog ran in the park." in listed
    assert "<<" not in listed


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("1, 3, 4", [True, False, True, True, False]),
        ("[2,5]", [False, True, False, False, True]),
        ("Texts 1 and 3.", [True, False, True, False, False]),
        ("2-4", [False, True, True, True, False]),
        ("1, 3 (no others)", [True, False, True, False, False]),
        ("0, 6, 2", [False, True, False, False, False]),  # out of range ignored
        ("none", [False] * 5),
        ("No.", [False] * 5),
        ("all", [True] * 5),
        ("yes\nno\nyes", [True, False, True, False, False]),
        ("1: no\n2. yes\nText 4) true\n- false", [False, True, False, True, False]),
        ("Yes\nNo\nYES\nno\nyes", [True, False, True, False, True]),
    ],
)
def test_parse_detection_formats(answer, expected):
    assert parse_detection(answer, 5) == expected


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ('Explanation: "The feature detects the word king."', "the word king"),
        ("the word 'king'.\nSecond line", "the word 'king'"),
        ("\n  **Royalty**", "Royalty"),
        ('the word "3" (4)', 'the word "3"'),
        ("This feature fires on: numbers.", "numbers"),
        ('"the word king', "the word king"),
        ("", ""),
    ],
)
def test_clean_explanation(raw, clean):
    assert clean_explanation(raw) == clean


def test_clean_explanation_bounds_length_at_a_word():
    text = clean_explanation("word " * 60, max_chars=23)
    assert text == "word word word word"


# ---- scoring -----------------------------------------------------------------------------------


class KeywordJudge(Explainer):
    """Says yes iff a keyword of the explanation is a word of the text (a perfect, literal judge)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def explain(self, messages_batch):
        from openai_server import answer

        return [answer(list(m)) for m in messages_batch]

    def judge(self, questions):
        scores = []
        for question in questions:
            explanation, text = split_detection_question(question)  # type: ignore[misc]
            self.seen.append(text)
            scores.append(1.0 if mentions(explanation, text) else 0.0)
        return scores


def test_detection_score_with_a_keyword_judge():
    judge = KeywordJudge()
    right = detection_score(judge, "the word king", KING, SILENT, seed=0)
    assert (right.balanced_accuracy, right.true_positive_rate, right.true_negative_rate, right.n) == (1.0, 1.0, 1.0, 8)
    # the judge saw the shuffled mix, the same for the same seed
    assert sorted(judge.seen) == sorted("".join(e.tokens) for e in KING + SILENT)
    first = list(judge.seen)
    judge.seen.clear()
    detection_score(judge, "the word king", KING, SILENT, seed=0)
    assert judge.seen == first
    assert first != ["".join(e.tokens) for e in KING + SILENT]

    wrong = detection_score(judge, "the word banana", KING, SILENT, seed=0)
    assert (wrong.true_positive_rate, wrong.true_negative_rate, wrong.balanced_accuracy) == (0.0, 1.0, 0.5)
    # an explanation that matches every text: all firing texts found, no silent one rejected
    everything = detection_score(judge, "park, market, town, bicycle or king", KING, SILENT, seed=1)
    assert (everything.true_positive_rate, everything.true_negative_rate, everything.balanced_accuracy) == (1, 0, 0.5)
    # 2 of 4 firing texts say "wise" or "old"; 1 of 4 silent ones says "old": TPR 2/4, TNR 3/4
    partial = detection_score(judge, "the word wise, old", KING, SILENT, seed=2)
    assert (partial.true_positive_rate, partial.true_negative_rate) == (0.5, 0.75)
    assert partial.balanced_accuracy == pytest.approx(0.625)

    listed = list_detection_score(judge, "the word king", KING, SILENT, seed=3)
    assert (listed.balanced_accuracy, listed.n) == (1.0, 8)
    none = detection_score(judge, "the word king", KING, [], seed=0)
    assert none.true_positive_rate == 1.0 and math.isnan(none.true_negative_rate) and math.isnan(none.balanced_accuracy)


def test_summarize():
    summary = summarize([0.5, 0.7, 0.9, 1.0, None, math.nan])
    assert summary["count"] == 4 and summary["missing"] == 2
    assert summary["mean"] == pytest.approx(0.775)
    assert summary["median"] == pytest.approx(0.8)
    assert summary["q25"] == pytest.approx(0.65) and summary["q75"] == pytest.approx(0.925)
    assert summary["share_ge_0.7"] == 0.75
    assert summarize([])["mean"] is None


def test_make_explainer_by_kind():
    assert make_explainer(ExplainerConfig(kind=NO_EXPLAINER)) is None
    assert set(EXPLAINERS) == {"local", "openai", "tokens", "literal"}


# ---- OpenAI-compatible endpoint (a real HTTP server on 127.0.0.1) ------------------------------


def openai_config(server: FakeOpenAIServer, **overrides) -> ExplainerConfig:
    fields = {"kind": "openai", "model": "fake", "base_url": server.base_url, "api_key_env": "CLT_TEST_KEY"}
    return ExplainerConfig(**{**fields, "retries": 3, "timeout_s": 10.0, **overrides})


def test_openai_explain_and_judge_through_a_real_server(monkeypatch):
    monkeypatch.delenv("CLT_TEST_KEY", raising=False)  # a local server needs no key
    evidence = king_evidence()
    with FakeOpenAIServer() as server, OpenAIExplainer(openai_config(server, concurrency=2)) as explainer:
        (raw,) = explainer.explain([explanation_messages(evidence)])
        explanation = clean_explanation(raw)
        assert explanation == 'the word "king"'
        score = detection_score(explainer, explanation, evidence.activating, evidence.non_activating, seed=0)
        assert (score.balanced_accuracy, score.n) == (1.0, 4)
        listed = list_detection_score(explainer, explanation, evidence.activating, evidence.non_activating, seed=0)
        assert listed.balanced_accuracy == 1.0
        body = server.bodies[0]
        assert body["model"] == "fake" and body["temperature"] == 0.0 and body["max_tokens"] == 40
        assert server.bodies[1]["logprobs"] is True  # judge asks for logprobs; this server sends none: text
    with FakeOpenAIServer(logprobs=True) as server, OpenAIExplainer(openai_config(server)) as explainer:
        questions = [detection_question("the word king", KING[0]), detection_question("the word king", SILENT[0])]
        assert explainer.judge(questions) == pytest.approx([0.9, 0.1])
    refusing = FakeOpenAIServer(refuse_logprobs=True)
    with refusing as server, OpenAIExplainer(openai_config(server, concurrency=1)) as explainer:
        assert explainer.judge(questions + questions) == [1.0, 0.0, 1.0, 0.0]
        assert not any(body.get("logprobs") for body in server.bodies[1:])  # asked once, then never again


def test_openai_concurrency_is_bounded():
    with (
        FakeOpenAIServer(delay_s=0.2) as server,
        OpenAIExplainer(openai_config(server, concurrency=3)) as explainer,
    ):
        answers = explainer.explain([explanation_messages(king_evidence())] * 9)
    assert answers == ['the word "king"'] * 9
    assert server.requests == 9
    assert server.max_in_flight == 3


@pytest.mark.parametrize("status", [500, 429])
def test_openai_retries_recover_from_transient_errors(status):
    with (
        FakeOpenAIServer(fail_first=2, fail_status=status) as server,
        OpenAIExplainer(openai_config(server, concurrency=1, retries=3), backoff_s=0.01) as explainer,
    ):
        assert explainer.judge([detection_question("the word king", KING[0])]) == [1.0]
    assert server.requests == 3


def test_openai_failures_name_the_base_url(monkeypatch):
    with (
        FakeOpenAIServer(always_fail=True) as server,
        OpenAIExplainer(openai_config(server, retries=2), backoff_s=0.01) as explainer,
    ):
        with pytest.raises(CLTError, match=re.escape(f"explainer.base_url={server.base_url}")) as err:
            explainer.explain([explanation_messages(king_evidence())])
        assert "after 2 attempts" in str(err.value) and "HTTP 500" not in str(err.value)
        assert server.requests == 2
    with (
        FakeOpenAIServer(always_fail=True, fail_status=401) as server,
        OpenAIExplainer(openai_config(server, retries=3), backoff_s=0.01) as explainer,
    ):
        with pytest.raises(CLTError, match="HTTP 401"):
            explainer.explain([explanation_messages(king_evidence())])
        assert server.requests == 1  # not retried
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    cfg = ExplainerConfig(kind="openai", base_url=closed, retries=2)
    with OpenAIExplainer(cfg, backoff_s=0.01) as explainer, pytest.raises(CLTError, match=re.escape(closed)):
        explainer.judge([detection_question("x", KING[0])])

    monkeypatch.delenv("CLT_TEST_KEY", raising=False)
    remote = ExplainerConfig(kind="openai", base_url="https://api.example.com/v1", api_key_env="CLT_TEST_KEY")
    with pytest.raises(CLTError, match="CLT_TEST_KEY"):
        make_explainer(remote)


# ---- the embedded local model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_explainer():
    from clt_forge.autointerp.explainers import LocalExplainer

    explainer = LocalExplainer(ExplainerConfig())
    yield explainer
    explainer.close()


@pytest.mark.slow
def test_local_explainer_explains_and_judges(local_explainer):
    evidence = king_evidence()
    (raw,) = local_explainer.explain([explanation_messages(evidence)])
    explanation = clean_explanation(raw)
    assert "king" in explanation.lower(), raw  # SmolLM2-135M answers 'the word "king"' (greedy)

    king, dog = local_explainer.judge(
        [
            detection_question("the word king", example("The king sat on the throne.")),
            detection_question("the word king", example("The dog ran in the park.")),
        ]
    )
    assert king > 0.9 and dog < 0.1, (king, dog)  # measured: 0.997 and 0.010

    score = detection_score(local_explainer, explanation, KING, SILENT, seed=0)
    assert score.balanced_accuracy >= 0.75, score
