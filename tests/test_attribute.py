"""`clt attribute`: conversion to circuit-tracer (in memory and on disk), the replacement model's
hooks, attribution graphs (tokens, unique ids, schema, labels, scores), interventions, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from circuit_tracer.graph import Graph
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

from clt_forge.artifacts.checkpoint import CheckpointInfo, save_checkpoint
from clt_forge.artifacts.graph import (
    EMBEDDING,
    ERROR,
    FEATURE,
    LOGIT,
    Cluster,
    NodeId,
    embedding_node_id,
    error_node_id,
    feature_node_id,
    graph_json,
    logit_node_id,
    parse_node,
    parse_node_id,
)
from clt_forge.artifacts.normalization import Normalization
from clt_forge.attribution.convert import export_circuit_tracer, to_circuit_tracer
from clt_forge.attribution.interventions import FeatureEdit
from clt_forge.attribution.replacement import replacement_model
from clt_forge.attribution.runner import AttributionRunner, AttributionSettings
from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.config.plain import plain
from clt_forge.errors import CLTError
from clt_forge.models.activations import hook_names, mlp_activations
from clt_forge.models.loading import load_model, model_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "tests" / "data" / "neuronpedia-graph-schema.json").read_text())
PROMPT = 'The opposite of "large" is "'
QUICK = AttributionSettings(max_feature_nodes=256, batch_size=64, verbose=False)


def random_checkpoint(folder: Path, model_name: str, d_features: int, seed: int = 0, skip: bool = False) -> Path:
    """A random CLT with non-trivial normalisation factors and biases (and a random skip
    connection with `skip`), saved as a checkpoint."""
    cfg = model_config(model_name)
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(cfg.n_layers, cfg.d_model, d_features, jumprelu_threshold=0.05, skip=skip)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.2)
        clt.b_dec.normal_(0, 0.2)
        clt.log_threshold.add_(torch.randn_like(clt.log_threshold) * 0.3)
        if clt.W_skip is not None:
            clt.W_skip.normal_(0, 0.5 / cfg.d_model**0.5)
    norm = Normalization(torch.rand(cfg.n_layers) * 3 + 0.2, torch.rand(cfg.n_layers) * 3 + 0.2)
    info = CheckpointInfo(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        d_features=d_features,
        bandwidth=1.0,
        model=plain(cfg),
        hooks=hook_names(cfg.n_layers),
    )
    return save_checkpoint(folder, clt, norm, info)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("attr") / "ckpt", "tiny", d_features=96)


@pytest.fixture(scope="module")
def tiny_runner(tiny_checkpoint) -> AttributionRunner:
    return AttributionRunner(tiny_checkpoint, settings=QUICK)


def reference_reconstruction(checkpoint: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our CLT on raw inputs [pos, L, D]: (features [L, pos, F], raw reconstruction [L, pos, D])."""
    from clt_forge.artifacts.checkpoint import load_checkpoint

    clt, norm, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        out = clt(norm.inputs(x))
    recon = out.reconstruction * norm.out_scale[:, None]
    return out.features.transpose(0, 1), recon.transpose(0, 1)


def test_converted_clt_maps_raw_inputs_to_the_same_reconstruction(tiny_checkpoint, tiny_model):
    tokens = tiny_model.to_tokens("Cross-layer transcoders read every layer.")
    mlp_in, _ = mlp_activations(tiny_model, tokens)
    x = mlp_in[0]  # [pos, L, D], raw model units
    features, expected = reference_reconstruction(tiny_checkpoint, x)
    converted = to_circuit_tracer(tiny_checkpoint)
    assert converted.W_dec is not None, "decoders are in memory (lazy_decoder=False)"
    raw = x.transpose(0, 1)  # circuit-tracer takes [L, pos, D]
    with torch.no_grad():
        got_features = converted.encode(raw)
        got = converted.decode(got_features.to_sparse())
    assert (features != 0).sum() > 0, "the test needs active features"
    torch.testing.assert_close(got_features, features, rtol=1e-5, atol=1e-5)
    rel = (got - expected).norm() / expected.norm()
    assert rel <= 1e-5, f"relative reconstruction error {rel:.2e}"


def test_export_is_read_back_equal_by_circuit_tracers_load_clt(tiny_checkpoint, tmp_path):
    folder = export_circuit_tracer(tiny_checkpoint, tmp_path / "ct")
    names = sorted(p.name for p in folder.iterdir())
    assert "config.yaml" in names and "W_enc_0.safetensors" in names and "W_dec_2.safetensors" in names
    assert "model_kind: cross_layer_transcoder" in (folder / "config.yaml").read_text()
    loaded = load_clt(str(folder), lazy_decoder=False, device=torch.device("cpu"), dtype=torch.float32)
    in_memory = to_circuit_tracer(tiny_checkpoint)
    for name, tensor in in_memory.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    with pytest.raises(FileExistsError, match="not empty"):
        export_circuit_tracer(tiny_checkpoint, folder)
    assert len(list(folder.iterdir())) == len(names), "a refused export leaves the folder alone"


def test_replacement_model_hooks_are_the_cached_activations(tiny_checkpoint, tiny_model):
    tokens = tiny_model.to_tokens("Hooks must match what clt cache stored.")
    mlp_in, mlp_out = mlp_activations(tiny_model, tokens)
    replacement = replacement_model(load_model("tiny"), to_circuit_tracer(tiny_checkpoint))
    _, cache = replacement.run_with_cache(tokens)
    for layer in range(replacement.cfg.n_layers):
        torch.testing.assert_close(cache[f"blocks.{layer}.mlp.hook_in"], mlp_in[:, :, layer], rtol=0, atol=0)
        torch.testing.assert_close(cache[f"blocks.{layer}.mlp.hook_out"], mlp_out[:, :, layer], rtol=0, atol=0)


def test_graph_json_has_prompt_tokens_unique_ids_labels_scores_and_schema(tiny_runner, tmp_path):
    result = tiny_runner.run(PROMPT)
    tokenizer = tiny_runner.model.tokenizer
    assert result.graph.input_tokens.tolist() == [
        tokenizer.bos_token_id,
        *tokenizer(PROMPT, add_special_tokens=False).input_ids,
    ]
    document = result.json
    jsonschema.validate(document, SCHEMA)
    ids = [node["node_id"] for node in document["nodes"]]
    assert len(ids) == len(set(ids)), "node ids are unique"
    kinds = {node["feature_type"] for node in document["nodes"]}
    assert {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"} <= kinds
    known = set(ids)
    assert all(link["source"] in known and link["target"] in known for link in document["links"])
    meta = document["metadata"]
    assert 0 <= meta["replacement_score"] <= 1 and 0 <= meta["completeness_score"] <= 1
    assert meta["prompt_tokens"][1:] == [tokenizer.decode([t]) for t in result.tokens[1:]]
    # labels by (layer, feature) land in the feature nodes' clerp
    feature = next(n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, index, _pos = (int(v) for v in feature["node_id"].split("_"))
    relabelled = graph_json(result.graph, tokenizer, slug="x", labels={(layer, index): "says large"})
    labelled = [n for n in relabelled["nodes"] if n["node_id"] == feature["node_id"]]
    assert labelled[0]["clerp"] == "says large"
    # the raw graph re-prunes to the same JSON without recomputing
    path = tiny_runner.save(result, tmp_path)
    raw = Graph.from_pt(str(tmp_path / json.loads(path.read_text())["metadata"]["raw_graph"]))
    again = graph_json(raw, tokenizer, slug=meta["slug"], metadata={k: v for k, v in meta.items() if k != "raw_graph"})
    assert again["nodes"] == json.loads(path.read_text())["nodes"]


def test_error_nodes_never_collide_with_layer_0_features():
    """circuit-tracer 0.5.0 names error (layer L, pos p) '0_L_p' = layer-0 feature L at pos p."""
    from clt_forge.artifacts.graph import error_node_id

    feature_id = "0_2_5"  # layer 0, feature 2, position 5
    assert error_node_id(2, 5) != feature_id
    assert error_node_id(2, 5) == "2_-1_5"  # as upstream circuit-tracer and Neuronpedia write it


def test_node_ids_round_trip_through_the_parser():
    """Every kind of id the writer makes parses back to its parts, and the parts write it again."""
    n_layers = 4
    written = {
        feature_node_id(2, 7, 5): NodeId(FEATURE, 2, 7, 5),
        error_node_id(2, 5): NodeId(ERROR, 2, None, 5),
        embedding_node_id(88, 0): NodeId(EMBEDDING, None, 88, 0),
        logit_node_id(n_layers, 262, 5): NodeId(LOGIT, n_layers + 1, 262, 5),
    }
    for node_id, parts in written.items():
        assert parse_node_id(node_id, n_layers) == parts
        assert parse_node({"node_id": node_id, "feature_type": str(parts.kind)}) == parts
        assert str(parts) == node_id
    assert parse_node_id(feature_node_id(2, 7, 5), n_layers).layer_pos_feature == (2, 5, 7)
    # a logit's id reads as a feature of layer n_layers + 1: its feature_type, or n_layers, tells
    assert parse_node({"node_id": "5_262_5", "feature_type": "cross layer transcoder"}).kind is FEATURE
    with pytest.raises(ValueError, match="layer 4 of a model with 4 layers"):
        parse_node_id("4_1_0", n_layers)
    for wrong in ("cluster:x", "1_2", "err_1", "E_x_0", "1_2_3_4", "", "-1_2_3", "0_1_2 "):
        with pytest.raises(ValueError, match="is not a node id"):
            parse_node_id(wrong, n_layers)
    with pytest.raises(ValueError, match="is not the id of a mlp reconstruction error node"):
        parse_node({"node_id": "0_2_5", "feature_type": "mlp reconstruction error"})
    with pytest.raises(ValueError, match="no node kind"):
        parse_node({"node_id": "0_2_5", "feature_type": "pixel"})
    with pytest.raises(ValueError, match="not a CLT feature"):
        _ = parse_node_id("1_-1_0", n_layers).layer_pos_feature
    # graph schema version 1 named errors err_L_p: still read as the error node, written anew
    for legacy in ("err_2_5", "2_-1_5"):
        assert parse_node_id(legacy, n_layers) == NodeId(ERROR, 2, None, 5)
        assert parse_node({"node_id": legacy, "feature_type": "mlp reconstruction error"}) == NodeId(ERROR, 2, None, 5)
    for wrong in ("E_-1_0", "err_-1_0", "2_-2_5", "2_-1_-1"):
        with pytest.raises(ValueError, match="is not a node id"):
            parse_node_id(wrong, n_layers)
    with pytest.raises(ValueError, match="layer 4 of a model with 4 layers"):
        parse_node_id("4_-1_0", n_layers)


def test_every_id_of_a_written_graph_parses_to_its_node(tiny_runner):
    document = tiny_runner.run(PROMPT).json
    n_layers = tiny_runner.model.cfg.n_layers
    kinds = set()
    for node in document["nodes"]:
        parts = parse_node(node)
        assert parse_node_id(node["node_id"], n_layers) == parts and str(parts) == node["node_id"]
        assert parts.kind == node["feature_type"] and parts.pos == node["ctx_idx"]
        assert node["layer"] == ("E" if parts.kind is EMBEDDING else str(parts.layer))
        kinds.add(parts.kind)
    assert kinds == {FEATURE, ERROR, EMBEDDING, LOGIT}


def test_interventions_scale_set_and_cluster(tiny_runner):
    ids = tiny_runner.tokens(PROMPT)
    _, acts = tiny_runner.model.get_activations(torch.tensor(ids))
    pos = len(ids) - 1
    layer, feature = (acts[:, pos] > 0).nonzero()[0].tolist()
    unchanged = tiny_runner.intervene(ids, [FeatureEdit(layer, pos, feature, scale=1.0)])
    for change in unchanged.top_after:
        assert change.prob_after == pytest.approx(change.prob_before, abs=1e-6)
    boosted = tiny_runner.intervene(ids, [FeatureEdit(layer, pos, feature, value=50.0)])
    assert max(abs(c.delta) for c in boosted.largest_changes) > 1e-3
    assert boosted.edits == [(layer, pos, feature, 50.0)]
    cluster = Cluster("both", (feature_node_id(layer, feature, pos),) * 2)
    members = cluster.features(tiny_runner.model.cfg.n_layers)
    doubled = tiny_runner.intervene(ids, [FeatureEdit(*m.layer_pos_feature, scale=0.0) for m in members])
    assert [e[3] for e in doubled.edits] == [0.0, 0.0]
    with pytest.raises(CLTError, match="out of range"):
        tiny_runner.intervene(ids, [FeatureEdit(99, 0, 0, value=1.0)])
    with pytest.raises(CLTError, match="exactly one"):
        FeatureEdit(0, 0, 0)


def test_embedded_model_graph_tokens_are_the_prompt_tokens(tmp_path):
    checkpoint = random_checkpoint(tmp_path / "ckpt", "smollm2_135m", d_features=16)
    runner = AttributionRunner(
        checkpoint, settings=AttributionSettings(max_feature_nodes=64, batch_size=64, verbose=False)
    )
    tokenizer = runner.model.tokenizer
    result = runner.run(PROMPT)
    assert result.graph.input_tokens.tolist() == result.tokens
    assert result.tokens == [tokenizer.bos_token_id, *tokenizer(PROMPT, add_special_tokens=False).input_ids]
    jsonschema.validate(result.json, SCHEMA)


def test_a_bos_whose_id_is_0_survives(tiny_checkpoint):
    """circuit-tracer 0.5.0 picks a "dummy BOS" with next(filter(None, ids)), which skips id 0:
    a string prompt loses a BOS of id 0. Passing token ids keeps it."""
    runner = AttributionRunner(tiny_checkpoint, settings=QUICK)
    tokenizer = runner.model.tokenizer
    tokenizer.add_special_tokens({"bos_token": tokenizer.convert_ids_to_tokens(0)})
    assert tokenizer.bos_token_id == 0
    ids = runner.tokens(PROMPT)
    assert ids[0] == 0
    assert runner.model.ensure_tokenized(PROMPT).tolist()[0] != 0, "the upstream behaviour this guards against"
    result = runner.run(PROMPT)
    assert result.graph.input_tokens.tolist() == ids


def test_cli_writes_graph_raw_graph_and_export(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n\nThe cat sat\n")
    out = tmp_path / "graphs"
    command = [
        sys.executable,
        "-m",
        "clt_forge",
        "attribute",
        f"checkpoint={tiny_checkpoint}",
        f"out={out}",
        f"prompts={prompts}",
        f"export={tmp_path / 'ct'}",
        "max_feature_nodes=128",
        "threads=1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.glob("*.json")) == ["hello-there.json", "the-cat-sat.json"]
    assert (out / "hello-there.pt").is_file() and (tmp_path / "ct" / "W_enc_0.safetensors").is_file()
    assert "clt serve" in done.stdout
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr


def test_cli_without_a_checkpoint_names_what_is_missing(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "clt_forge", "attribute", f"checkpoint={tmp_path / 'none'}", f"out={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 2
    assert f"no CLT checkpoint at {tmp_path / 'none'}" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_edge_weights_equal_direct_effects_of_constrained_interventions(tmp_path, skip):
    """circuit-tracer's own check: adding k times a feature's activation to it (every layer
    constrained, attention and norms frozen, no propagation through other features) moves each
    feature's pre-activation and each target logit (demeaned) by k times that feature's edge
    weight to it. A large k lifts tiny effects above float32 rounding of the base values. With a
    skip connection (clt.skip) the direct effects also run through every later layer's skip."""
    checkpoint = random_checkpoint(tmp_path / "ckpt", "smollm2_135m", d_features=8, seed=1, skip=skip)
    runner = AttributionRunner(
        checkpoint, settings=AttributionSettings(max_feature_nodes=None, batch_size=256, verbose=False)
    )
    model = runner.model
    graph = runner.run("The opposite of large is").graph
    ids = graph.input_tokens
    active = graph.active_features
    n_active, n_logits = len(active), len(graph.logit_targets)
    assert len(graph.selected_features) == n_active, "every active feature is a node"
    targets = torch.tensor([t.vocab_idx for t in graph.logit_targets])
    with torch.no_grad():
        logits, pre = model.get_activations(ids, apply_activation_function=False)
    base_acts = pre[active[:, 0], active[:, 1], active[:, 2]]
    base_logits = logits[0, -1, targets] - logits[0, -1].mean()
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for node in torch.randperm(n_active, generator=generator)[:8].tolist():
        layer, pos, feature = active[node].tolist()
        k = 1e4
        boosted = (1 + k) * float(pre[layer, pos, feature])
        with torch.no_grad():
            new_logits, new_pre = model.feature_intervention(
                ids,
                [(layer, pos, feature, boosted)],
                constrained_layers=range(model.cfg.n_layers),
                apply_activation_function=False,
            )
        expected = k * graph.adjacency_matrix[:, node]
        moved = new_pre[active[:, 0], active[:, 1], active[:, 2]] - base_acts
        moved_logits = new_logits[0, -1, targets] - new_logits[0, -1].mean() - base_logits
        for got, want in ((moved, expected[:n_active]), (moved_logits, expected[-n_logits:])):
            if want.abs().max() == 0:  # e.g. a last-layer feature: no feature reads it
                assert got.abs().max() == 0, f"node {node} {active[node].tolist()} moved what it has no edge to"
                continue
            checked += 1
            relative = (got - want).norm() / want.norm()
            assert relative <= 1e-4, (
                f"node {node} {active[node].tolist()}: relative error {relative:.2e}, |want| {want.norm():.3e}, n {len(want)}"
            )
    assert checked >= 12, f"only {checked} of the 16 comparisons had direct effects to check"


def test_checkpoint_of_another_model_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(CLTError, match=r"d_model: checkpoint 64, config 576"):
        AttributionRunner(tiny_checkpoint, model_name="smollm2_135m", settings=QUICK)


def test_explanations_from_a_feature_database_label_the_nodes(tiny_checkpoint, tmp_path):
    from clt_forge.artifacts.features import FeatureStore, read_explanations

    rows = [
        {
            "layer": layer,
            "feature": feature,
            "n_active": 1,
            "frequency": 0.1,
            "mean_act": 1.0,
            "max_act": 1.0,
            "histogram": [],
            "top_tokens": [],
            "top_logits": [],
            "bottom_logits": [],
            "explanation": f"feature {layer}/{feature}",
            "status": "explained",
        }
        for layer in range(3)
        for feature in range(96)
    ]
    with FeatureStore(tmp_path / "features.db") as store:
        store.write_pass(rows, [])
    runner = AttributionRunner(tiny_checkpoint, labels=read_explanations(tmp_path / "features.db"), settings=QUICK)
    nodes = [n for n in runner.run(PROMPT).json["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert nodes
    for node in nodes:
        layer, index, _ = node["node_id"].split("_")
        assert node["clerp"] == f"feature {layer}/{index}"
