"""Feature labels a researcher can trust: the threshold-free scorer with its control, the
evidence-only `tokens` explainer, the rejection rules and best-candidate choice of the LLM kinds,
the feature database's version-2 columns, and the start-up check of explainer.kind."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from openai_server import FakeOpenAIServer, mentions

from clt_forge.artifacts.features import VERSION, Example, FeatureEvidence, FeatureStore
from clt_forge.autointerp.explainers import Explainer, make_explainer
from clt_forge.autointerp.labels import choose_labels, naming_absent_tokens, rejection
from clt_forge.autointerp.literal import DENSE_OTHER, ONLY_TOKEN, Claim, LiteralJudge, claim, preceding
from clt_forge.autointerp.prompts import (
    detection_question,
    split_detection_question,
    split_token_question,
    token_question,
)
from clt_forge.autointerp.scoring import (
    CONTROL_FALLBACK,
    auroc,
    explainer_evidence,
    pick_control,
    score_with_control,
    spread,
    token_items,
    verdict,
)
from clt_forge.autointerp.tokens import TokensExplainer, in_top_contexts, quoted, token_key, tokens_label
from clt_forge.config.schema import ExplainerConfig
from clt_forge.errors import CLTError

REPO = Path(__file__).resolve().parents[1]


def example(text: str, hot: Sequence[str] = (), act: float = 4.0) -> Example:
    tokens = re.findall(r" ?\w+|[^\w\s]|\n", text)
    return Example(tokens, [act if token.strip() in hot or token in hot else 0.0 for token in tokens])


NOT = [example(f"I do not know {w}.", ["not"]) for w in ("him", "her", "it", "why")] + [
    example("She did not go.", ["not"])
]
NUMBERS = [example(f"In chapter {n} verse {n} we read", [str(n)]) for n in (1, 2, 3, 12, 7)]
QUIET = [example(t) for t in ("The dog ran.", "Rain fell on the town.", "He fixed it.", "A cat sat there.")]


def evidence(top: list[Example], logits: Sequence[str] = (" be",)) -> FeatureEvidence:
    return FeatureEvidence(layer=0, feature=1, top_examples=top, top_logits=list(logits), non_activating=QUIET)


class KeywordJudge(Explainer):
    """P(yes) = 1 iff a keyword of the explanation is a word of the text; explains with fixed answers."""

    def __init__(self, answers: Sequence[str] = ()) -> None:
        self.answers = list(answers)

    def explain(self, messages_batch):
        return [self.answers[0] for _ in messages_batch]

    def sample(self, messages_batch, n):
        return [self.answers[1 : 1 + n] for _ in messages_batch]

    def judge(self, questions):
        parts = [split_detection_question(q) or split_token_question(q)[:2] for q in questions]  # type: ignore[index]
        return [1.0 if mentions(*p) else 0.0 for p in parts]


# ---- the scorer ---------------------------------------------------------------------------------


def test_auroc_is_threshold_free_and_counts_ties_half():
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auroc([0.1], [0.9]) == 0.0
    assert auroc([0.5, 0.5], [0.5, 0.5]) == 0.5
    assert auroc([0.51, 0.52], [0.50, 0.49]) == 1.0  # below any fixed 0.5 threshold's resolution
    assert auroc([3.0, 1.0], [2.0, 0.0]) == 0.75
    assert math.isnan(auroc([], [0.1]))


def test_spread_keeps_every_activation_quantile():
    ranked = [Example(["x"], [float(v)]) for v in range(100)]
    kept = spread(ranked, 5)
    assert [e.max_act for e in kept] == [99.0, 74.0, 49.0, 25.0, 0.0]  # ranks 0, 25, 50, 74, 99 (round half to even)
    assert len(spread(ranked[:3], 5)) == 3


def test_score_with_control_uses_the_same_contexts():
    result = score_with_control(KeywordJudge(), "the word not", "the word chapter", NOT, QUIET)
    assert (result.score, result.control, result.n_firing, result.n_silent) == (1.0, 0.5, 5, 4)
    assert result.difference == 0.5 and (result.true_positive_rate, result.true_negative_rate) == (1.0, 1.0)


def test_pick_control_is_another_features_explanation():
    labels = {(0, 1): "the word not", (0, 2): "the word not", (1, 5): "numbers"}
    assert pick_control((0, 1), labels, seed=0) == "numbers"  # never its own text
    assert pick_control((0, 1), {(0, 1): "x"}, seed=0) == CONTROL_FALLBACK


def test_verdict_flags_an_uninformative_scorer_loudly():
    good = verdict([0.9, 0.95, 0.85, 1.0], [0.5, 0.55, 0.45, 0.6])
    assert good["informative"] and good["mean_difference"] == pytest.approx(0.4)
    assert good["share_beats_control_by_0.2"] == 1.0
    bad = verdict([0.55, 0.5, 0.6, 0.5], [0.5, 0.55, 0.52, 0.5])
    assert not bad["informative"] and "UNINFORMATIVE SCORER" in bad["message"]


# ---- the literal judge -------------------------------------------------------------------------


def test_literal_claims_read_the_quoted_tokens_or_the_class_before_after_and_promotes():
    assert claim('"and" (20/20 top contexts), after "," (10/20); promotes "such"') == Claim(frozenset({"and"}))
    assert claim('the word "King"') == Claim(frozenset({"king"}))
    assert claim('punctuation: "?" (9/30 sampled), ";" (7/30 sampled)') == Claim(frozenset({"?", ";"}))
    assert claim('newlines (4/4 top contexts); promotes "And"') == Claim(frozenset(), "newlines")
    assert claim('numbers: "1" (1/5), "2" (1/5)') == Claim(frozenset({"1", "2"}), "numbers")
    typical = '"not" (5/5 top contexts), after "do" (4/5); typical: "no" (3/9 sampled), "\\n" (2/9); promotes "be"'
    assert claim(typical) == Claim(frozenset({"not", "no", "\n"})) and preceding(typical) == "do"
    assert claim('newlines (4/4 top contexts); typical: "the" (2/9 sampled)') == Claim(frozenset({"the"}), "newlines")
    assert claim("words about royalty") is None and claim("punctuation marks") is None


class WordTokenizer:
    """Words and punctuation marks as tokens (leading space kept), the encode / decode pair the
    literal judge reads a text with."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.pieces = re.findall(r" ?\w+|[^\w\s]|\n", text)
        return list(range(len(self.pieces)))

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_literal_judge_counts_claimed_tokens_and_hands_the_rest_to_its_fallback():
    judge = LiteralJudge(ExplainerConfig(kind="literal"))
    judge._fallback, judge._tokenizer = KeywordJudge(), WordTokenizer()
    questions = [
        detection_question('"not" (5/5 top contexts), after "do" (4/5)', example("I do not know, not now.")),
        detection_question('"not" (5/5 top contexts), after "do" (4/5)', example("I do know it.")),
        detection_question("newlines (4/4 top contexts)", example("one\ntwo")),
        detection_question("the dog", example("The dog ran.")),  # no literal claim: the fallback
        detection_question("the cat", example("The dog ran.")),
    ]
    assert judge.judge(questions) == pytest.approx([2 / 2.5, 0.0, 1 / 1.5, 1.0, 0.0])
    firing, silent = NOT, QUIET
    scored = score_with_control(judge, tokens_label(evidence(NOT)), '"dog" (3/3 top contexts)', firing, silent)
    assert scored.score == 1.0 and scored.control < 0.5, scored  # "dog" is in a silent context


# ---- the token scorer ---------------------------------------------------------------------------


def test_token_question_marks_one_token_and_reads_back():
    e = Example(["A", " cat", "\n", " <<x", " not", "."], [0, 0, 1, 0, 2, 0])
    q = token_question('"not"', e, 4)
    assert "A cat\\n < <x <<not>>." in q[-1]["content"]  # the text's own << is spaced out: one mark
    assert split_token_question(q) == ('"not"', "not", "A cat\n < <x ")
    assert split_token_question(token_question("newlines", e, 2)) == ("newlines", "\n", "A cat")
    assert split_token_question(detection_question('"not"', e)) is None
    assert split_detection_question(q) is None  # the context judges never mistake one for the other


def test_token_items_mark_peaks_and_silent_tokens_of_every_context():
    dense = Example(["a", "b", "c"], [1.0, 3.0, 2.0])  # fires on every token: no negative from it
    firing = [*NOT, dense]
    positives, negatives = token_items(firing, QUIET, seed=0)
    assert [e.tokens[i] for e, i in positives] == [" not"] * 5 + ["b"]
    assert len(negatives) == 5 + len(QUIET) and all(e.acts[i] == 0 for e, i in negatives)
    assert token_items(firing, QUIET, seed=0) == (positives, negatives)  # seeded
    assert [i for _, i in token_items(firing, QUIET, seed=1)[1]] != [i for _, i in negatives]


def test_literal_judge_answers_token_questions_from_the_claim():
    judge = LiteralJudge(ExplainerConfig(kind="literal"))
    judge._fallback, judge._tokenizer = KeywordJudge(), WordTokenizer()
    e = example("I do not know, not now.")
    label = '"not" (5/5 top contexts), after "do" (4/5); promotes "know"'
    assert preceding(label) == "do" and preceding('"not"; promotes ", after "x""') is None
    questions = [
        token_question(label, e, 2),  # "not" after "do"
        token_question(label, e, 5),  # "not" after ","
        token_question(label, e, 3),  # "know": promoted, not claimed
        token_question('"not"', e, 5),
        token_question("newlines", example("one\ntwo"), 1),
        token_question("the word know", e, 3),  # no literal claim: the fallback (its own question form)
    ]
    assert judge.judge(questions) == [1.0, ONLY_TOKEN, 0.0, 1.0, 1.0, 1.0]


def test_token_scorer_scores_a_feature_without_silent_contexts():
    judge = LiteralJudge(ExplainerConfig(kind="literal"))
    judge._fallback, judge._tokenizer = KeywordJudge(), WordTokenizer()
    label, control = tokens_label(evidence(NOT)), '"dog" (3/3 top contexts)'
    scored = score_with_control(judge, label, control, NOT, QUIET, "token", seed=0)
    assert (scored.score, scored.n_firing, scored.n_silent) == (1.0, 5, 9)
    assert scored.control == 0.5  # "dog" is never a marked token: ties everywhere
    alone = score_with_control(judge, label, control, NOT, [], "token", seed=0)  # every context fires
    assert alone.score == 1.0 and alone.n_silent == 5
    assert math.isnan(score_with_control(judge, label, control, NOT, []).score)  # the context scorer cannot


# ---- the tokens explainer and the rejection rules ------------------------------------------------


def test_tokens_label_names_the_dominant_token_preceding_token_and_decoder():
    label = tokens_label(evidence(NOT, [" know", " be"]))
    assert label.startswith('"not" (5/5 top contexts)'), label
    assert 'after "do" (4/5)' in label and label.endswith('promotes "know", "be"')
    numbers = tokens_label(evidence(NUMBERS, []))
    assert numbers.startswith('numbers: "1" (1/5)') or numbers.startswith("numbers:"), numbers
    newlines = tokens_label(evidence([example(f"line {i}\nnext", ["\n"]) for i in range(4)], []))
    assert newlines.startswith("newlines (4/4"), newlines
    assert tokens_label(evidence([])) == ""


def test_tokens_label_names_the_typical_tokens_of_its_sampled_firing_contexts():
    """Sampled peaks, most common first, only those more common at the feature's peaks than where it
    is silent ("the" peaks as often as "never" but is a quarter of the zero positions, so naming it
    would tell nothing apart) and found in the top contexts ("nothing" is not: "no" there is a word,
    not the start of "nothing")."""
    peaks = ("no", "no", "never", "no", "nothing", "never", "the", "the")
    weak = [example(f"we saw {w} there", [w], act=0.5) for w in peaks] + NOT[:1]
    silent = [example("the dog and the cat saw the town and the sea")] * 5
    top = [*NOT[:4], example("She did not go, no, never, to the end.", ["not"])]
    label = tokens_label(FeatureEvidence(0, 1, top_examples=top, activating=weak, non_activating=silent))
    typical = 'typical: "no" (3/9 sampled), "never" (2/9)'
    assert label == f'"not" (5/5 top contexts), after "do" (4/5); {typical}'
    assert rejection(label, FeatureEvidence(0, 1, top_examples=top)) is None
    without_silent = tokens_label(FeatureEvidence(0, 1, top_examples=top, activating=weak))
    assert without_silent.endswith(f'{typical}, "the" (2/9)'), without_silent
    assert (
        tokens_label(FeatureEvidence(0, 1, top_examples=NOT, activating=weak))
        == '"not" (5/5 top contexts), after "do" (4/5)'
    )
    assert (
        tokens_label(FeatureEvidence(0, 1, top_examples=NOT, activating=NOT))
        == '"not" (5/5 top contexts), after "do" (4/5)'
    )


def test_in_top_contexts_matches_tokens_and_whole_words():
    baths = Example(["the", " b", "aths", "\n"], [0.0, 1.0, 0.0, 0.0])
    e = FeatureEvidence(0, 1, top_examples=[*NOT, baths], top_logits=[" be"])
    assert all(in_top_contexts(name, e) for name in ("not", "Not", "know", "\\n", ".", "be", "baths", "b", "aths"))
    assert not any(in_top_contexts(name, e) for name in ("no", "kn", "now", "bath", "?", "' '"))
    spaced = FeatureEvidence(0, 1, top_examples=[Example(["a", " ", "b"], [0.0, 1.0, 0.0])])
    assert in_top_contexts("' '", spaced) and not in_top_contexts("'\\n'", spaced)


def test_explainers_never_read_the_contexts_a_label_is_scored_on():
    firing = [example(f"word{i} here", [f"word{i}"], act=float(i + 1)) for i in range(40)]
    e = FeatureEvidence(0, 1, top_examples=NOT, activating=firing, non_activating=QUIET * 3, top_tokens=[("x", 99)])
    seen = explainer_evidence(e, half=4)
    scored = spread(firing, 4)
    assert len(seen.activating) == 36 and not {id(x) for x in scored} & {id(x) for x in seen.activating}
    assert seen.non_activating == (QUIET * 3)[4:]  # the scorer's silent contexts are the first `half`
    assert dict(seen.top_tokens)[" not"] == 5 and "x" not in dict(seen.top_tokens)  # recounted: top + unscored
    assert not {t for t, _ in seen.top_tokens} & {x.tokens[0] for x in scored}


def test_tokens_label_names_a_class_whose_top_contexts_favour_one_member():
    """Top contexts all peak on "?" but the feature fires on ": ; ? !" alike (its counted firing tokens):
    the class is named, with the members it fires on; when "?" also dominates the firing tokens, the
    label stays the token."""
    questions = [example(f"Why {w}? Tell me: yes; no", ["?"]) for w in ("so", "not", "now", "here", "then")]
    spread_out = FeatureEvidence(0, 1, questions, top_tokens=[("?", 9), (":", 8), ("!", 7), (";", 6)])
    label = tokens_label(spread_out)  # "!" is not in the top contexts, so it is not named
    assert label.startswith('punctuation: "?" (9/30 sampled), ":" (8/30 sampled), ";" (6/30 sampled)'), label
    one_member = FeatureEvidence(0, 1, questions, top_tokens=[("?", 25), (":", 3), ("!", 2)])
    assert tokens_label(one_member).startswith('"?" (5/5 top contexts)'), tokens_label(one_member)


def test_rejection_rules():
    e = evidence(NOT)
    assert rejection('the word "not"', e) is None
    assert rejection("the feature of the feature of the feature of", e) == "repeats itself"
    assert rejection('the word "apple"', e).startswith("copies the worked examples")  # type: ignore[union-attr]
    assert rejection("names of cities", e).startswith("copies")  # type: ignore[union-attr]
    assert rejection('the word "baths"', e) == 'names "baths", absent from the top contexts'
    assert rejection('makes "be" likely', e) is None  # a decoder-promoted token may be named
    assert rejection("", e) == "empty"


def test_llm_candidates_are_filtered_then_the_best_scoring_kept():
    e = evidence(NOT)
    answers = ['the word "baths"', "the word know", "the word not"]  # rejected, weak, right
    (choice,) = choose_labels(KeywordJudge(answers), KeywordJudge(), [e], 3, [QUIET])
    assert choice.label == "the word not" and choice.candidates == 3 and not choice.fallback
    assert list(choice.rejected) == ['the word "baths"']
    (fallback,) = choose_labels(KeywordJudge(["the feature of the feature of"]), KeywordJudge(), [e], 1, [QUIET])
    assert fallback.fallback and fallback.label == tokens_label(e)


def test_tokens_explainer_is_registered_and_delegates_judging(monkeypatch):
    monkeypatch.setenv("CLT_TEST_KEY", "k")
    with FakeOpenAIServer(logprobs=True) as server:
        cfg = ExplainerConfig(kind="tokens", judge="openai", model="fake", base_url=server.base_url)
        explainer = make_explainer(cfg)
        assert isinstance(explainer, TokensExplainer)
        with explainer:
            assert explainer.describe([evidence(NOT)]) == [[tokens_label(evidence(NOT))]]
            result = score_with_control(explainer, "the word not", "numbers", NOT, QUIET)
    assert result.score == 1.0 and result.control == 0.5


def test_unknown_explainer_kind_fails_at_start_up(tmp_path):
    with pytest.raises(CLTError, match="tokens"):
        make_explainer(ExplainerConfig(kind="typo"))
    with pytest.raises(CLTError, match="language model"):
        make_explainer(ExplainerConfig(kind="local", judge="tokens"))
    done = subprocess.run(
        [sys.executable, "-m", "clt_forge", "autointerp", "explainer.kind=typo", f"checkpoint={tmp_path}/none"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "explainer.kind" in done.stderr + done.stdout
    assert "typo" in done.stderr + done.stdout and "checkpoint" not in (done.stderr + done.stdout).split("typo")[0]


def test_unknown_scorer_fails_before_any_work(tmp_path):
    from omegaconf import OmegaConf

    from clt_forge.autointerp.runner import AutoInterp
    from clt_forge.autointerp.scoring import score_store
    from clt_forge.config.compose import compose_stage

    cfg = OmegaConf.to_object(compose_stage("autointerp", ["scorer=tokens", f"checkpoint={tmp_path}/none"]))
    with pytest.raises(CLTError, match=r"scorer='tokens': use one of context, token"):
        AutoInterp(cfg).run(out=tmp_path / "out")  # before the checkpoint is even looked for
    assert not (tmp_path / "out").exists()
    with pytest.raises(CLTError, match="scorer='fuzz'"):
        score_store(None, KeywordJudge(), half=4, seed=0, scorer="fuzz")  # type: ignore[arg-type]


# ---- the feature database ---------------------------------------------------------------------------


def test_version_1_database_is_upgraded_and_scores_keep_their_control(tmp_path):
    path = tmp_path / "v1.db"
    with FeatureStore(path) as store:
        store.write_pass(
            [{"layer": 0, "feature": 1, "n_active": 1, "frequency": 0.1, "mean_act": 1.0, "max_act": 1.0}
             | {"histogram": [], "top_tokens": [], "top_logits": [], "bottom_logits": [], "status": "scored"}],
            [],
        )  # fmt: skip
    with sqlite3.connect(path) as db:  # make it what version 1 wrote: no control columns
        db.execute("ALTER TABLE features DROP COLUMN score_control")
        db.execute("ALTER TABLE features DROP COLUMN score_difference")
        db.execute("UPDATE features SET score = 0.75")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'version'")
    with FeatureStore(path, create=False) as store:
        assert store.meta()["version"] == VERSION == 2 and store.meta()["scorer"] == "balanced_accuracy"
        assert store.scores() == [0.75] and store.controls() == [None]
        store.set_score(0, 1, 0.9, 1.0, 0.8, control=0.6)
        record = store.feature(0, 1)
    assert record is not None
    assert (record["score"], record["score_control"]) == (0.9, 0.6)
    assert record["score_difference"] == pytest.approx(0.3)
    summary = verdict([0.9], [0.6])
    assert json.dumps(summary)  # what summary.json holds


def test_a_straight_quote_token_is_quoted_so_the_label_parses():
    top = [example(f'He said "{w} now', ['"']) for w in ("go", "stop", "wait")]
    label = tokens_label(FeatureEvidence(0, 1, top_examples=top))
    assert label.startswith('“"” (3/3 top contexts)'), label
    assert quoted(label)[0] == '"' and rejection(label, FeatureEvidence(0, 1, top_examples=top)) is None


def test_a_newline_and_a_space_newline_are_one_token_in_labels():
    """Both are shown "\\n": they are counted as one token, so a label never lists "\\n" twice."""
    top = [*NOT[:4], Example(["She", " did", " not", " go", ".", "\n"], [0.0, 0.0, 4.0, 0.0, 0.0, 0.0])]
    weak = [Example(["a", nl, "b"], [0.0, 0.5, 0.0]) for nl in ("\n", " \n", "\n")]
    label = tokens_label(FeatureEvidence(0, 1, top_examples=top, activating=weak))
    assert label.endswith('typical: "\\n" (3/3 sampled)'), label
    assert token_key(" \n") == token_key("\n") == "\n" and token_key("  ") == "  "


def test_a_dense_feature_is_labelled_by_the_tokens_it_is_silent_on_too():
    """Firing on 40% of tokens, it stays silent on "the" and "and" (most of its zero positions) and
    fires weakly on everything else: the label names those two as silent, never a token it peaks on
    as often as it is silent on it ("dog"), nor one absent from the top contexts ("sea")."""
    top = [example("the dog and the cat ran", ["cat"]) for _ in range(3)]
    weak = [
        Example(tokens, [0.0 if t in (" the", " and", "the", " sea") else 0.5 for t in tokens])
        for tokens in [["the", " dog", " and", " the", " sea", " ran"], ["the", " cat", " and", " the", " dog"]]
    ]
    silent = [example("the and the sea and")]
    dense = FeatureEvidence(0, 1, top_examples=top, activating=weak, non_activating=silent, frequency=0.4)
    label = tokens_label(dense)
    assert label.endswith('; fires on 40% of tokens, not on "the" (6/12 silent), "and" (4/12)'), label
    assert rejection(label, dense) is None
    assert "fires on" not in tokens_label(dataclasses.replace(dense, frequency=0.01))
    said = claim(label)
    assert said is not None and said.dense and said.silent == frozenset({"the", "and"}) and "the" not in said.tokens


def test_literal_judge_answers_a_dense_feature_s_token_questions_from_where_it_is_silent():
    judge = LiteralJudge(ExplainerConfig(kind="literal"))
    judge._fallback, judge._tokenizer = KeywordJudge(), WordTokenizer()
    e = example("the cat and the dog ran")
    label = '"cat" (3/3 top contexts); fires on 40% of tokens, not on "the" (7/11 silent), "and" (3/11)'
    positions = [1, 0, 2, 4]  # cat: claimed firing; the, and: claimed silent; dog: neither
    assert judge.judge([token_question(label, e, i) for i in positions]) == [1.0, 0.0, 0.0, DENSE_OTHER]
    assert judge.judge([token_question('"cat" (3/3 top contexts)', e, 4)]) == [0.0]  # a sparse label


def test_the_summary_counts_labels_naming_a_token_absent_from_the_top_contexts(tmp_path):
    row = {"n_active": 3, "frequency": 0.1, "mean_act": 1.0, "max_act": 4.0, "histogram": [], "top_tokens": []}
    row |= {"top_logits": [" be"], "bottom_logits": [], "status": "explained"}
    top = [example(f"I do not know {w}.", ["not"]) for w in ("him", "her", "it")]
    examples = [
        {"layer": 0, "feature": f, "kind": "top", "rank": r, "position": r, "value": 4.0, "center": 3}
        | {"token_ids": list(range(len(e.tokens))), "tokens": e.tokens, "acts": e.acts}
        for f in (1, 2, 3)
        for r, e in enumerate(top)
    ]
    with FeatureStore(tmp_path / "features.db") as store:
        store.write_pass([{"layer": 0, "feature": f} | row for f in (1, 2, 3)], examples)
        store.set_explanation(0, 1, '"not" (3/3 top contexts); promotes "be"')
        store.set_explanation(0, 2, 'the word "no"')  # "no" is only inside "not" and "know"
        store.set_explanation(0, 3, 'the word "baths"')
        assert naming_absent_tokens(store) == ["0/2", "0/3"]
        assert naming_absent_tokens(store, [(0, 1), (0, 3)]) == ["0/3"]
