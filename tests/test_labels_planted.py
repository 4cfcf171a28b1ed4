"""Planted features on the embedded model (SmolLM2-135M-Instruct, offline): a CLT whose layer-0
features read known directions (one word, a word class, newlines, never) goes through
`clt autointerp explainer=tokens`; the evidence-only label must name each behaviour, and the scorer
(the default judge of explainer=tokens: literal, literal.py) must rank each true label above another
feature's (its control), with the token scorer (the default) and with the context scorer."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from clt_forge.artifacts.checkpoint import CheckpointInfo, save_checkpoint
from clt_forge.artifacts.features import FeatureStore
from clt_forge.artifacts.normalization import Normalization
from clt_forge.autointerp.literal import LiteralJudge
from clt_forge.autointerp.runner import AutoInterp
from clt_forge.autointerp.scoring import score_store, verdict
from clt_forge.autointerp.source import model_windows
from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.config.compose import compose_stage
from clt_forge.config.plain import plain
from clt_forge.config.schema import ExplainerConfig
from clt_forge.models.activations import hook_names
from clt_forge.models.loading import load_model, model_config

pytestmark = pytest.mark.slow

TOKENS = 4096
PUNCTUATION = {":", ";", "?", "!"}  # rarer than "," and ".", so windows without any exist (silent contexts)
PLANTED: dict[str, tuple[int, Callable[[str], bool]]] = {  # name: (feature, which tokens it reads)
    "word": (0, lambda t: t == " and"),
    "class": (1, lambda t: t in PUNCTUATION),
    "newline": (2, lambda t: "\n" in t),
}
SILENT_FEATURE = 3


def config(*overrides: str):
    return OmegaConf.to_object(compose_stage("autointerp", [f"tokens={TOKENS}", "threads=2", *overrides]))


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory) -> Path:
    cfg = model_config("smollm2_135m")
    model = load_model(cfg)
    _, batches = model_windows(model, config().data)
    tokens, inputs, seen = [], [], 0
    for t, x in batches:
        tokens.append(t.reshape(-1))
        inputs.append(x.reshape(-1, *x.shape[2:]))
        seen += t.numel()
        if seen >= TOKENS:
            break
    ids, mlp_in = torch.cat(tokens)[:TOKENS], torch.cat(inputs)[:TOKENS]
    text = [model.tokenizer.decode([i]) for i in ids.tolist()]
    clt = CrossLayerTranscoder(cfg.n_layers, cfg.d_model, 4, jumprelu_threshold=0.01)
    norm = Normalization(mlp_in.square().mean(dim=(0, 2)).sqrt(), torch.ones(cfg.n_layers))
    x = norm.inputs(mlp_in)[:, 0]
    with torch.no_grad():
        clt.b_enc.fill_(-1e4)  # every feature silent unless planted below
        for feature, member in PLANTED.values():
            on = torch.tensor([member(t) for t in text])
            # mean over the member token types, so no one type dominates a class's direction
            types = sorted({i for i, t in zip(ids.tolist(), text, strict=True) if member(t)})
            direction = torch.stack([x[ids == i].mean(0) for i in types]).mean(0) - x[~on].mean(0)
            scores = x @ direction
            clt.W_enc[0][:, feature] = direction
            clt.b_enc[0, feature] = -float(scores[~on].quantile(0.995))
    info = CheckpointInfo(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        d_features=4,
        bandwidth=1.0,
        model=plain(cfg),
        hooks=hook_names(cfg.n_layers),
    )
    root = tmp_path_factory.mktemp("planted")
    checkpoint = save_checkpoint(root / "ckpt", clt, norm, info)
    graph = root / "graph.json"
    features = [f for f, _ in PLANTED.values()] + [SILENT_FEATURE]
    nodes = [{"node_id": f"0_{f}_1", "layer": "0", "feature_type": "cross layer transcoder"} for f in features]
    graph.write_text(json.dumps({"nodes": nodes}))
    overrides = ["explainer=tokens", f"checkpoint={checkpoint}", f"features_from={graph}", "silent_every=64"]
    return AutoInterp(config(*overrides, f"out={root / 'run'}")).run()


def test_tokens_explainer_names_every_planted_feature(planted_run):
    with FeatureStore(planted_run, create=False) as store:
        labels = {name: store.feature(0, f)["explanation"] for name, (f, _) in PLANTED.items()}  # type: ignore[index]
        silent = store.feature(0, SILENT_FEATURE)
    print(labels)
    assert labels["word"].startswith('"and"'), labels
    assert labels["class"].startswith("punctuation") or sum(f'"{p}"' in labels["class"] for p in PUNCTUATION) >= 2
    assert labels["newline"].startswith("newlines"), labels
    assert silent is not None and silent["status"] == "dead" and silent["explanation"] is None


def test_scorer_ranks_every_true_label_above_another_features(planted_run):
    assert json.loads((planted_run.parent / "summary.json").read_text())["scorer"]["scored_on"] == "token"
    with FeatureStore(planted_run, create=False) as store:
        rows = [store.feature(0, f) for f, _ in PLANTED.values()]
    for row in rows:
        assert row is not None and row["status"] == "scored"
        print(row["feature"], row["explanation"], row["score"], row["score_control"])
        assert not math.isnan(row["score"]) and row["score"] > row["score_control"], row
    summary = json.loads((planted_run.parent / "summary.json").read_text())
    assert summary["scorer"]["pairs"] == 3 and summary["scorer"]["mean_score"] > summary["scorer"]["mean_control"]
    assert summary["scorer"]["informative"], summary["scorer"]  # the mean difference clears 0.1 and 2 stderr
    assert summary["labels_naming_absent_tokens"] == 0


def test_context_scorer_ranks_every_true_label_above_another_features(planted_run, tmp_path):
    copy = shutil.copy(planted_run, tmp_path / "features.db")
    with FeatureStore(copy, create=False) as store:
        store.set_status("explained", "scored")
        score_store(store, LiteralJudge(ExplainerConfig(kind="literal")), half=20, seed=0, scorer="context")
        rows = [store.feature(0, f) for f, _ in PLANTED.values()]
        summary = verdict(store.scores(), store.controls())
    for row in rows:
        assert row is not None and row["status"] == "scored"
        print("context", row["feature"], row["explanation"], row["score"], row["score_control"])
        assert not math.isnan(row["score"]) and row["score"] > row["score_control"], row
    assert summary["pairs"] == 3 and summary["informative"], summary
