"""`clt serve` in a real browser (Debian's Chromium driven by Playwright), plus its pieces.

One graph is made with the `clt attribute` machinery on the embedded model (a small random
CLT whose decoders are scaled up, so that features, not only error nodes, survive pruning),
with a small feature database beside it. The browser tests then click a feature and read its
examples, make and save a cluster and see it after a reload, run queued interventions and
read the logit chart, and open malformed graphs. Screenshots of each step are written to
test-artifacts/serve/ (git-ignored; nothing depends on them).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import torch

from clt_forge.artifacts.graph import Cluster, GraphFileError, read_graph, save_clusters
from clt_forge.serve import launch_interface
from clt_forge.serve.clusters import add_cluster, collapse
from clt_forge.serve.graphs import GraphLibrary
from clt_forge.serve.pruning import GraphView, Pruner

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "tests" / "data" / "neuronpedia-graph-schema.json").read_text())
SHOTS = REPO / "test-artifacts" / "serve"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "The capital of France is"
D_FEATURES = 16
WORDS = [" the", " king", " of", " France", " spoke", " to", " Paris", " is", " a", " city", " in", " spring"]
HIST_EDGES = [2.0**k * (1 + j / 4) for k in range(-10, 10) for j in range(4)] + [2.0**10]


# ---- the graph, its feature database, and a folder with broken files -----------------------------


def loud_checkpoint(folder: Path, d_features: int) -> Path:
    """A random CLT for the embedded model whose decoders are 30x the usual scale: its features
    carry enough of the MLP outputs to survive pruning next to the error nodes."""
    from clt_forge.artifacts.checkpoint import CheckpointInfo, save_checkpoint
    from clt_forge.artifacts.normalization import Normalization
    from clt_forge.clt.model import CrossLayerTranscoder
    from clt_forge.config.plain import plain
    from clt_forge.models.activations import hook_names
    from clt_forge.models.loading import model_config

    cfg = model_config("smollm2_135m")
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(cfg.n_layers, cfg.d_model, d_features, jumprelu_threshold=0.05)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.2)
        clt.W_dec.mul_(30.0)
    norm = Normalization(torch.ones(cfg.n_layers), torch.ones(cfg.n_layers))
    info = CheckpointInfo(cfg.n_layers, cfg.d_model, d_features, 1.0, plain(cfg), hook_names(cfg.n_layers))
    return save_checkpoint(folder, clt, norm, info)


def feature_database(path: Path, n_layers: int, d_features: int) -> Path:
    """Every feature explained ("capital cities (L/F)"), with three top examples each."""
    from clt_forge.artifacts.features import FeatureStore

    rows, examples = [], []
    for layer in range(n_layers):
        for feature in range(d_features):
            histogram = [0] * (len(HIST_EDGES) + 1)
            histogram[40 + feature % 8] = 30
            histogram[50] = 10
            rows.append(
                {
                    "layer": layer,
                    "feature": feature,
                    "n_active": 40,
                    "frequency": 0.0125,
                    "mean_act": 1.5,
                    "max_act": 6.0,
                    "histogram": histogram,
                    "top_tokens": [[" Paris", 9]],
                    "top_logits": [" Paris", " Lyon", " Rome"],
                    "bottom_logits": [" the", " of"],
                    "explanation": f"capital cities ({layer}/{feature})",
                    "score": 0.81,
                    "score_tpr": 0.8,
                    "score_tnr": 0.82,
                    "status": "scored",
                }
            )
            for rank in range(3):
                tokens = [WORDS[(feature + rank + i) % len(WORDS)] for i in range(10)]
                acts = [0.0] * 10
                acts[6] = 6.0 - rank
                acts[5] = 1.0
                examples.append(
                    {
                        "layer": layer,
                        "feature": feature,
                        "kind": "top",
                        "rank": rank,
                        "position": rank,
                        "value": acts[6],
                        "center": 6,
                        "token_ids": list(range(10)),
                        "tokens": tokens,
                        "acts": acts,
                    }
                )
    with FeatureStore(path) as store:
        store.write_pass(rows, examples, hist_edges=HIST_EDGES)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A graph from `clt attribute` (JSON + raw .pt), its checkpoint and feature database, and
    a malformed and a wrong-schema JSON beside it."""
    from clt_forge.artifacts.features import read_explanations
    from clt_forge.attribution.runner import AttributionRunner, AttributionSettings

    root = tmp_path_factory.mktemp("serve")
    checkpoint = loud_checkpoint(root / "ckpt", D_FEATURES)
    features = feature_database(root / "features.db", 30, D_FEATURES)
    settings = AttributionSettings(max_feature_nodes=48, batch_size=64, node_threshold=0.9, verbose=False)
    runner = AttributionRunner(
        checkpoint, labels=read_explanations(features), features_path=features, settings=settings
    )
    graphs = root / "graphs"
    graph = runner.save(runner.run(PROMPT), graphs)
    del runner  # the model's memory back before the browser and the intervention worker start
    gc.collect()
    (graphs / "broken.json").write_text('{"metadata": {"slug": "broken"}, "nodes": [')
    (graphs / "wrong-schema.json").write_text(json.dumps({"metadata": {"prompt_tokens": ["a"]}, "nodes": []}))
    return {"root": root, "graph": graph, "checkpoint": checkpoint, "features": features}


@pytest.fixture(scope="module")
def server(made):
    with launch_interface(made["graph"], port=0, block=False, cache_dir=made["root"] / "cache", threads=1) as handle:
        yield handle


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def web(chromium):
    """A fresh browser page; fails the test on any JavaScript error in it."""
    context = chromium.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def open_graph(page, url: str, name: str | None = None) -> dict:
    page.goto(url + (f"?graph={name}" if name else ""))
    page.wait_for_function("window.cltServe && window.cltServe.ready", timeout=60_000)
    return page.evaluate("window.cltServe.ready")


def click_node(page, node_id: str, shift: bool = False) -> None:
    at = page.evaluate("(id) => window.cltServe.nodePosition(id)", node_id)
    assert at is not None, f"{node_id} is not drawn"
    if shift:
        page.keyboard.down("Shift")
    page.mouse.click(at["x"], at["y"])
    if shift:
        page.keyboard.up("Shift")


def graph_json(made) -> dict:
    return json.loads(made["graph"].read_text())


def feature_ids(document: dict) -> list[str]:
    nodes = [n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"]
    return [n["node_id"] for n in sorted(nodes, key=lambda n: -(n["activation"] or 0))]


# ---- in the browser ----------------------------------------------------------------------------


@pytest.mark.slow
def test_clicking_a_feature_shows_its_examples_and_other_nodes_their_facts(made, server, web):
    assert server.url.startswith("http://127.0.0.1:"), "bound to the loopback interface by default"
    document = graph_json(made)
    ready = open_graph(web, server.url)
    assert ready["key"] == made["graph"].name
    assert ready["nodes"] == len(document["nodes"]) and ready["edges"] == len(document["links"])
    assert "re-pruned from the raw graph" in web.inner_text("#view-note")
    node_id = feature_ids(document)[0]
    layer, feature, _ = (int(x) for x in node_id.split("_"))
    at = web.evaluate("(id) => window.cltServe.nodePosition(id)", node_id)
    web.mouse.move(at["x"], at["y"])
    web.wait_for_selector("#hover-tip", state="visible")
    assert f"capital cities ({layer}/{feature})" in web.inner_text("#hover-tip")
    click_node(web, node_id)
    web.wait_for_selector(f"#panel [data-node='{node_id}']", timeout=10_000)
    panel = web.inner_text("#panel")
    assert f"Feature L{layer} #{feature}" in panel and f"capital cities ({layer}/{feature})" in panel
    assert "detection score" in panel and "0.81" in panel and "1.25%" in panel  # score, frequency
    examples = web.locator("#panel .example")
    assert examples.count() == 3
    centre = examples.nth(0).locator(".tok.centre")
    assert centre.inner_text() == WORDS[(feature + 6) % len(WORDS)]  # the token the top example is about
    assert centre.get_attribute("title") == "6"  # and the feature's activation on it
    assert "background" in (centre.get_attribute("style") or "")
    assert web.locator("#panel .hist-bar").count() == 32 and web.locator("#panel .hist-mark").count() == 1
    assert web.locator("#panel .chip.pos").all_inner_texts()[:2] == [" Paris", " Lyon"]
    shot(web, "01-feature-panel")

    logit = next(n for n in document["nodes"] if n["feature_type"] == "logit" and n["is_target_logit"])
    click_node(web, logit["node_id"])
    web.wait_for_selector(f"#panel [data-node='{logit['node_id']}']", timeout=10_000)
    assert f"{logit['token_prob']:.3f}" in web.inner_text("#panel")
    error = next(n for n in document["nodes"] if n["feature_type"] == "mlp reconstruction error")
    click_node(web, error["node_id"])
    web.wait_for_selector(f"#panel [data-node='{error['node_id']}']", timeout=10_000)
    assert "magnitude" in web.inner_text("#panel")

    # the node-threshold slider re-prunes from the raw graph: fewer nodes at 0.8 than at 0.9
    web.locator("#node-threshold [role=slider]").focus()
    for _ in range(10):
        web.keyboard.press("ArrowLeft")
    web.wait_for_function("window.cltServe.ready.view.includes(', 0.8, ')", timeout=30_000)
    fewer = web.evaluate("window.cltServe.ready")
    assert 0 < fewer["nodes"] < ready["nodes"]
    assert web.evaluate(OVERLAPS) == 0, "the boxes of the re-pruned graph are laid out again, apart"
    shot(web, "02-pruned-at-0.8")


def make_cluster(web, first: str, second: str, name: str) -> None:
    """Select two nodes (click, shift-click) and group them as the cluster `name`."""
    click_node(web, first)
    click_node(web, second, shift=True)
    web.wait_for_selector("text=2 nodes selected", timeout=10_000)
    web.fill("#cluster-name", name)
    web.click("#cluster-create")
    web.wait_for_selector(f"[data-cluster='{name}']", timeout=10_000)


@pytest.mark.slow
def test_a_cluster_is_saved_into_the_graph_and_shown_after_a_reload(made, server, web):
    open_graph(web, server.url)
    first, second = feature_ids(graph_json(made))[:2]
    make_cluster(web, first, second, "says a capital")
    assert f"saved to {made['graph'].name}" in web.inner_text("#cluster-status")
    saved = graph_json(made)
    assert saved["qParams"]["supernodes"] == [["says a capital", first, second]]
    jsonschema.validate(saved, SCHEMA)
    assert not list(made["graph"].parent.glob(".*.tmp")), "no temporary file is left behind"
    shot(web, "03-cluster")

    web.reload()
    web.wait_for_function("window.cltServe && window.cltServe.ready && window.cltServe.ready.key", timeout=60_000)
    web.wait_for_selector("[data-cluster='says a capital']", timeout=10_000)
    assert web.evaluate(f"window.cy.getElementById('{first}').hasClass('member')")
    web.click("#collapse label")
    web.wait_for_function("window.cltServe.ready.view.includes('true')", timeout=30_000)
    cluster_id = "cluster:says a capital"
    assert web.evaluate(f"window.cy.getElementById('{cluster_id}').length") == 1
    assert web.evaluate(f"window.cy.getElementById('{first}').length") == 0
    assert web.evaluate(OVERLAPS) == 0, "the collapsed cluster takes a member's box: it overlaps no other box"
    # aggregated links: one per neighbour, carrying the summed weight of the links it replaces
    into = {}
    for link in saved["links"]:
        if link["source"] in (first, second) and link["target"] not in (first, second):
            into[link["target"]] = into.get(link["target"], 0.0) + link["weight"]
    drawn = web.evaluate(
        "(id) => window.cy.getElementById(id).outgoers('edge').map(e => [e.data('target'), e.data('weight')])",
        cluster_id,
    )
    assert len(drawn) == len(into)
    for target, weight in drawn:
        assert weight == pytest.approx(into[target], rel=1e-6)
    click_node(web, cluster_id)
    web.wait_for_selector(f"#panel [data-node='{cluster_id}']", timeout=10_000)
    assert "members (2)" in web.inner_text("#panel").lower()
    shot(web, "04-collapsed-cluster")

    with web.expect_download() as download:
        web.click("#export")
    exported = json.loads(Path(download.value.path()).read_text())
    jsonschema.validate(exported, SCHEMA)
    ids = {n["node_id"] for n in exported["nodes"]}
    assert {first, second} <= ids and all(n["feature_type"] != "mlp reconstruction error" for n in exported["nodes"])
    assert all(link["source"] in ids and link["target"] in ids for link in exported["links"])
    assert exported["qParams"]["supernodes"] == [["says a capital", first, second]]


@pytest.mark.slow
def test_queued_interventions_run_in_the_background_and_update_the_logit_chart(made, server, web):
    document = graph_json(made)
    open_graph(web, server.url)
    target = next(n for n in document["nodes"] if n["feature_type"] == "logit" and n["is_target_logit"])
    node_id = feature_ids(document)[0]
    click_node(web, node_id)
    web.wait_for_selector(f"#panel [data-node='{node_id}']", timeout=10_000)
    web.wait_for_function("document.querySelector('#target').innerText.includes('feature L')", timeout=10_000)
    web.click("label:has-text('set to')")
    web.fill("#amount", "400")
    web.click("#queue")
    web.wait_for_selector("[data-number='1']", timeout=10_000)
    # the page stays responsive while the worker loads the model and runs job 1
    other = feature_ids(document)[1]
    started = time.perf_counter()
    click_node(web, other)
    web.wait_for_selector(f"#panel [data-node='{other}']", timeout=10_000)
    assert time.perf_counter() - started < 5
    web.wait_for_selector("[data-job='1']", timeout=300_000)
    rows = web.locator("#jobs-view .chart-row")
    assert rows.count() >= 10
    chart_one = dict(
        zip(
            rows.evaluate_all("rs => rs.map(r => r.dataset.token)"),
            rows.evaluate_all("rs => rs.map(r => +r.dataset.after)"),
            strict=True,
        )
    )
    # the clean run is the one attributed: the target token's probability before the edit matches the graph's
    token = target["clerp"][target["clerp"].index('"') + 1 : target["clerp"].rindex('"')]
    assert token in chart_one
    bars = web.locator(f"#jobs-view .chart-row[data-token='{token}'] .bars").get_attribute("title") or ""
    assert float(bars.split(",")[0].removeprefix("before ")) == pytest.approx(target["token_prob"], abs=2e-3)
    web.locator("#jobs-view .chart").scroll_into_view_if_needed()
    shot(web, "05-intervention")

    # two more jobs queue behind each other; the chart follows the newest finished one
    web.click("label:has-text('scale by')")
    web.fill("#amount", "0")
    web.click("#queue")
    web.fill("#amount", "-20")
    web.click("#queue")
    web.wait_for_selector("[data-number='3']", timeout=10_000)
    statuses = web.locator("#jobs-view .job-row").evaluate_all("rs => rs.map(r => r.dataset.status)")
    assert len(statuses) == 3
    # the worker runs all three in order; the page's board and chart follow it to job 3
    web.wait_for_selector("[data-job='3']", timeout=300_000)
    statuses = web.locator("#jobs-view .job-row").evaluate_all("rs => rs.map(r => r.dataset.status)")
    assert statuses == ["done"] * 3
    chart_three = dict(
        zip(
            rows.evaluate_all("rs => rs.map(r => r.dataset.token)"),
            rows.evaluate_all("rs => rs.map(r => +r.dataset.after)"),
            strict=True,
        )
    )
    assert chart_three != chart_one  # scaling by -20 is not setting to 400
    shot(web, "06-queued-interventions")


@pytest.mark.slow
def test_an_intervention_started_from_the_subgraph_shows_the_top_tokens_before_and_after(made, server, web):
    document = graph_json(made)
    target = next(n for n in document["nodes"] if n["feature_type"] == "logit" and n["is_target_logit"])
    open_graph(web, server.url)
    third, fourth, lone = (feature_ids(document)[i] for i in (2, 3, 4))  # in no other test's cluster
    make_cluster(web, third, fourth, "steered pair")
    try:
        web.evaluate("(ids) => window.cltServe.pin(ids)", [lone, third, fourth])
        web.wait_for_function("window.cltServe.subgraph && window.cltServe.subgraph.nodes === 2", timeout=10_000)
        # a feature of the subgraph, then the cluster, become the target when clicked there
        lone_box = f"#subgraph .sub-node[data-node='{lone}']"
        web.wait_for_selector(lone_box, state="visible", timeout=60_000)  # the subgraph's render, on a busy machine
        web.locator(lone_box).click()
        web.wait_for_selector(f"#panel [data-node='{lone}']", timeout=10_000)
        web.wait_for_function("document.querySelector('#target').innerText.includes('feature L')", timeout=10_000)
        web.locator("#subgraph .sub-node[data-node='cluster:steered pair']").click()
        web.wait_for_function("document.querySelector('#target').innerText.includes('steered pair')", timeout=10_000)
        web.click("label:has-text('set to')")
        web.fill("#amount", "400")
        web.click("#queue")
        web.wait_for_selector("#queue-status:has-text('queued job #')", timeout=10_000)
        number = web.inner_text("#queue-status").rsplit("#", 1)[1].strip()
        web.wait_for_selector(f"[data-job='{number}']", timeout=300_000)
        assert "“steered pair” = 400" in web.inner_text(f"[data-job='{number}'] .chart-title")
        rows = web.locator(f"[data-job='{number}'] .chart-row")
        assert rows.count() >= 10, "the top next tokens, before and after"
        bars = rows.evaluate_all("rs => rs.map(r => r.querySelector('.bars').getAttribute('title'))")
        before_after = [[float(part.split()[1]) for part in bar.split(", ")] for bar in bars]
        assert any(abs(before - after) > 1e-3 for before, after in before_after), (
            "setting both features moved the output"
        )
        token = target["clerp"][target["clerp"].index('"') + 1 : target["clerp"].rindex('"')]
        title = (
            web.locator(f"[data-job='{number}'] .chart-row[data-token='{token}'] .bars").get_attribute("title") or ""
        )
        assert float(title.split(",")[0].removeprefix("before ")) == pytest.approx(target["token_prob"], abs=2e-3)
        web.locator("#subgraph").scroll_into_view_if_needed()
        shot(web, "14-intervention-from-subgraph")
    finally:  # the pins are saved into the graph: the other tests must see it unpinned even after a failure
        web.click("#unpin-all")
        web.wait_for_function("window.cltServe.subgraph.nodes === 0", timeout=10_000)


@pytest.mark.slow
def test_malformed_graphs_show_an_error_page_and_the_server_keeps_serving(made, server, web):
    open_graph(web, server.url, "broken.json")
    web.wait_for_selector("#error-box:visible", timeout=10_000)
    message = web.inner_text("#error-box")
    assert "broken.json" in message and "not valid JSON" in message and "line 1" in message
    assert not web.locator("#main").is_visible()
    shot(web, "07-malformed-graph")
    open_graph(web, server.url, "wrong-schema.json")
    web.wait_for_selector("#error-box:visible", timeout=10_000)
    assert "wrong-schema.json: missing key 'links'" in web.inner_text("#error-box")
    open_graph(web, server.url, "..%2Fgraphs%2Fbroken.json")
    web.wait_for_selector("#error-box:visible", timeout=10_000)
    assert "is not a graph file in" in web.inner_text("#error-box")
    # the picker lists the folder's graphs, and choosing the good one opens it
    web.click("#picker")
    options = web.get_by_role("option")
    assert sorted(options.all_inner_texts()) == ["broken.json", made["graph"].name, "wrong-schema.json"]
    web.get_by_role("option", name=made["graph"].name).click()
    web.wait_for_function(
        "(name) => window.cltServe.ready && window.cltServe.ready.key === name", arg=made["graph"].name, timeout=30_000
    )
    assert web.evaluate("window.location.search") == f"?graph={made['graph'].name}"
    assert web.evaluate("window.cltServe.ready.nodes") > 0
    assert not web.locator("#error-box").is_visible()
    assert web.evaluate("window.cy.zoom()") > 0.3, "drawn while hidden, fitted once shown"
    shot(web, "08-picked-after-an-error")


# ---- the command line --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_clt_serve_takes_the_graph_as_first_argument(made, tmp_path):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "clt_forge", "serve", str(made["graph"]), f"port={port}", f"runs={tmp_path}"]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_clt/initial", timeout=30) as response:
                    drawing = json.loads(response.read())
                break
            except OSError:
                assert time.monotonic() < deadline, "clt serve did not answer within 120 s"
                time.sleep(0.5)
        assert drawing["key"] == made["graph"].name and drawing["nodes"] > 0
        assert list(tmp_path.glob("serve/*/cache")), "the run folder holds the job cache"
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl+C: the server stops and the command ends cleanly
        output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output
    assert f"http://127.0.0.1:{port}/" in output


def test_clt_serve_without_a_graph_says_what_it_needs(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "clt_forge", "serve", str(tmp_path / "missing.json"), f"runs={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"graph={tmp_path / 'missing.json'}: no such file or folder" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "clt_forge", "serve", f"runs={tmp_path}"], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2 and "clt serve needs a graph" in done.stderr


# ---- the pieces, without a browser ---------------------------------------------------------------


def small_graph() -> dict:
    nodes = [
        {
            "node_id": "E_5_0",
            "feature": 0,
            "layer": "E",
            "ctx_idx": 0,
            "feature_type": "embedding",
            "jsNodeId": "E",
            "clerp": "",
        },
        {
            "node_id": "0_3_0",
            "feature": 9,
            "layer": "0",
            "ctx_idx": 0,
            "feature_type": "cross layer transcoder",
            "jsNodeId": "a",
            "clerp": "a",
            "influence": 0.2,
        },
        {
            "node_id": "1_4_0",
            "feature": 19,
            "layer": "1",
            "ctx_idx": 0,
            "feature_type": "cross layer transcoder",
            "jsNodeId": "b",
            "clerp": "b",
            "influence": 0.5,
        },
        {
            "node_id": "1_-1_0",
            "feature": -1,
            "layer": "1",
            "ctx_idx": 0,
            "feature_type": "mlp reconstruction error",
            "jsNodeId": "c",
            "clerp": "",
            "influence": 0.95,
        },
        {
            "node_id": "3_7_0",
            "feature": 7,
            "layer": "3",
            "ctx_idx": 0,
            "feature_type": "logit",
            "jsNodeId": "d",
            "clerp": 'Output "x" (p=0.500)',
            "token_prob": 0.5,
        },
    ]
    links = [
        {"source": "E_5_0", "target": "0_3_0", "weight": 1.0},
        {"source": "E_5_0", "target": "1_4_0", "weight": 0.5},
        {"source": "0_3_0", "target": "1_4_0", "weight": 2.0},
        {"source": "0_3_0", "target": "3_7_0", "weight": -1.0},
        {"source": "1_4_0", "target": "3_7_0", "weight": 3.0},
        {"source": "1_-1_0", "target": "3_7_0", "weight": 0.01},
    ]
    metadata = {
        "slug": "small",
        "scan": "x",
        "prompt": "x",
        "prompt_tokens": ["x"],
        "pruning_settings": {"node_threshold": 0.8, "edge_threshold": 0.98},
        "schema_version": 2,
    }
    return {"metadata": metadata, "qParams": {"supernodes": []}, "nodes": nodes, "links": links}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.pop("links"), "missing key 'links'"),
        (
            lambda d: d["links"].append({"source": "E_5_0", "target": "nope", "weight": 1}),
            "links[6].target 'nope' is not a node id",
        ),
        (lambda d: d["nodes"][2].update(node_id="0_3_0"), "nodes[2].node_id '0_3_0' repeats nodes[1]"),
        (lambda d: d["nodes"][1].update(ctx_idx=4), "nodes[1].ctx_idx 4 is outside the prompt (1 tokens)"),
        (lambda d: d["links"][0].update(weight=float("nan")), "links[0].weight must be a finite number"),
        (lambda d: d["qParams"].update(supernodes=[["name", 3]]), "qParams.supernodes[0] must be a list of strings"),
        (lambda d: d["nodes"][0].update(feature_type="pixel"), "nodes[0].feature_type 'pixel' is not one of"),
    ],
)
def test_a_wrong_graph_is_refused_naming_the_problem(tmp_path, change, expected):
    document = small_graph()
    change(document)
    path = tmp_path / "g.json"
    path.write_text(json.dumps(document))
    with pytest.raises(GraphFileError, match=r"g\.json") as raised:
        read_graph(path)
    assert expected in str(raised.value)


def test_a_graph_of_a_newer_schema_version_is_refused_naming_the_file_and_version(tmp_path):
    from clt_forge.attribution.labels import label_graph

    for version in (None, 1, 2):  # files without the field are version 1, as Neuronpedia reads them
        document = small_graph()
        document["metadata"].pop("schema_version")
        if version is not None:
            document["metadata"]["schema_version"] = version
        (tmp_path / "g.json").write_text(json.dumps(document))
        assert read_graph(tmp_path / "g.json").slug == "small"
    document["metadata"]["schema_version"] = 99
    (tmp_path / "g.json").write_text(json.dumps(document))
    with pytest.raises(GraphFileError, match=r"g\.json: graph schema_version 99 is newer") as raised:
        read_graph(tmp_path / "g.json")
    assert "up to 2" in str(raised.value)
    with pytest.raises(GraphFileError, match=r"g\.json: graph schema_version 99"):
        GraphLibrary(tmp_path).load("g.json")
    with pytest.raises(GraphFileError, match=r"g\.json: graph schema_version 99"):
        label_graph(tmp_path / "g.json", tmp_path / "features.db")  # refused before the database is read
    document["metadata"]["schema_version"] = "one"
    (tmp_path / "g.json").write_text(json.dumps(document))
    with pytest.raises(GraphFileError, match=r"g\.json: unknown graph schema_version 'one'"):
        read_graph(tmp_path / "g.json")


def test_a_version_1_graph_is_read_with_its_error_ids_renamed_and_saved_as_version_2(tmp_path):
    """Version 1 named error nodes err_L_p (circuit-tracer 0.5.0: 0_L_p); read as L_-1_p everywhere."""
    old = small_graph()
    old["metadata"].pop("schema_version")
    old["nodes"][3]["node_id"] = "err_1_0"
    old["links"][5]["source"] = "err_1_0"
    old["qParams"] = {
        "supernodes": [["mixed", "0_3_0", "err_1_0"]],
        "pinnedIds": ["err_1_0", "1_4_0"],
        "clickedId": "err_1_0",
    }
    path = tmp_path / "g.json"
    path.write_text(json.dumps(old))
    document = read_graph(path)
    assert document.metadata["schema_version"] == 2
    expected = small_graph()["nodes"]
    expected[3]["jsNodeId"] = "1_-1-0"
    assert document.nodes == expected
    assert document.links == small_graph()["links"]
    assert document.supernodes == [["mixed", "0_3_0", "1_-1_0"]]
    assert (
        document.data["qParams"]["pinnedIds"] == ["1_-1_0", "1_4_0"]
        and document.data["qParams"]["clickedId"] == "1_-1_0"
    )
    assert str(document.parse("1_-1_0")) == "1_-1_0" and document.parse("1_-1_0").kind == "mlp reconstruction error"
    save_clusters(document, document.clusters)  # saving writes the upgraded file
    saved = json.loads(path.read_text())
    assert saved["metadata"]["schema_version"] == 2 and "err_1_0" not in path.read_text()
    jsonschema.validate(saved, SCHEMA)
    # circuit-tracer 0.5.0's error id 0_L_p is renamed too, unless a layer-0 feature has that id
    ct = small_graph()
    ct["metadata"].pop("schema_version")
    ct["nodes"][3]["node_id"], ct["links"][5]["source"] = "0_1_0", "0_1_0"
    path.write_text(json.dumps(ct))
    assert read_graph(path).links == small_graph()["links"]
    ct["nodes"][1]["node_id"] = "0_1_0"  # the collision: refused rather than guessed
    path.write_text(json.dumps(ct))
    with pytest.raises(GraphFileError, match="'0_1_0' is not the id of a mlp reconstruction error node"):
        read_graph(path)


def test_the_library_opens_only_graph_files_in_its_folder(tmp_path):
    (tmp_path / "graphs").mkdir()
    (tmp_path / "graphs" / "a.json").write_text(json.dumps(small_graph()))
    (tmp_path / "secret.json").write_text(json.dumps(small_graph()))
    library = GraphLibrary(tmp_path / "graphs" / "a.json")
    assert library.names() == ["a.json"] and library.first() == "a.json"
    for name in ("../secret.json", str(tmp_path / "secret.json"), "b.json", ""):
        with pytest.raises(GraphFileError, match="is not a graph file"):
            library.load(name)
    assert library.sibling(library.load("a.json"), "../secret.json") is None


def test_saving_clusters_is_atomic_and_keeps_the_rest_of_the_file(tmp_path, monkeypatch):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(small_graph()))
    document = read_graph(path)
    clusters = add_cluster([], "first", ["0_3_0", "1_4_0"])
    save_clusters(document, clusters)
    saved = json.loads(path.read_text())
    assert saved["qParams"]["supernodes"] == [["first", "0_3_0", "1_4_0"]]
    assert saved["nodes"] == small_graph()["nodes"] and saved["links"] == small_graph()["links"]
    clusters = add_cluster(clusters, "second", ["1_4_0"])  # a node moves to the newer cluster
    assert clusters == [Cluster("first", ("0_3_0",)), Cluster("second", ("1_4_0",))]
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", fail)
    with pytest.raises(OSError, match="disk full"):
        save_clusters(document, clusters)
    assert path.read_bytes() == before, "a failed save leaves the file as it was"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json"], "and no temporary file"
    assert document.supernodes == [["first", "0_3_0", "1_4_0"]]


def test_collapse_sums_the_links_between_groups(tmp_path):
    document = small_graph()
    view = GraphView(document["nodes"], document["links"], exact=False)
    nodes, links = collapse(view, [Cluster("both", ("0_3_0", "1_4_0"))])
    assert {n["node_id"] for n in nodes} == {"E_5_0", "1_-1_0", "3_7_0", "cluster:both"}
    weights = {(link["source"], link["target"]): link["weight"] for link in links}
    assert weights == {("E_5_0", "cluster:both"): 1.5, ("cluster:both", "3_7_0"): 2.0, ("1_-1_0", "3_7_0"): 0.01}


def test_pruning_without_the_raw_graph_prunes_the_saved_links_further(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(small_graph()))
    pruner = Pruner(read_graph(path), None)
    assert len(pruner.view(0.8, 0.98).links) == 6, "at the saved thresholds, the graph as saved"
    tighter = pruner.view(0.3, 0.9)
    assert {n["node_id"] for n in tighter.nodes} == {"E_5_0", "0_3_0", "3_7_0"}  # influence <= 0.3
    assert not pruner.exact and pruner.error_magnitudes() == {"1_-1_0": 0.01}


def test_re_pruning_the_raw_graph_at_the_saved_thresholds_gives_the_saved_graph(made):
    document = read_graph(made["graph"])
    pruner = Pruner(document, made["graph"].with_suffix(".pt"))
    view = pruner.view(0.9, 0.98)
    assert pruner.exact
    assert [n["node_id"] for n in view.nodes] == [n["node_id"] for n in document.nodes]
    assert view.links == document.links


# ---- readable view, subgraph, proposed clusters (a graph with planted groups) ------------------

PLANTED_LABELS = [
    ["says Paris", "Paris the city", "Paris (capital)"],
    ["France the country", "about France", "France nation"],
    ["capital city words", "capital of a country", "capital letters"],
]


def planted_graph(seed: int = 0) -> dict:
    """A graph of a 4-layer model: three groups of three features at the last position built to
    share their effects (one pattern per group, 5% noise), six distractor features with their
    own effects, ten downstream features and three logits."""
    import random

    rng = random.Random(seed)
    tokens = ["<s>", "The", " capital", " is"]

    def node(node_id, kind, layer, pos, clerp="", influence=0.5, **extra):
        return {
            "node_id": node_id,
            "feature": 0,
            "layer": layer,
            "ctx_idx": pos,
            "feature_type": kind,
            "jsNodeId": node_id,
            "clerp": clerp,
            "influence": influence,
            "activation": 1.0,
            **extra,
        }

    nodes = [node(f"E_{10 + p}_{p}", "embedding", "E", p) for p in range(4)]
    logits = [f"5_{100 + k}_3" for k in range(3)]
    for k, token in enumerate([" Paris", " Lyon", " the"]):
        nodes.append(node(logits[k], "logit", "5", 3, f'Output "{token}" (p={0.5 / (k + 1):.3f})', token_prob=0.1))
    downstream = [f"3_{k}_3" for k in range(10)]
    nodes += [node(d, "cross layer transcoder", "3", 3, f"downstream {k}", 0.6) for k, d in enumerate(downstream)]
    targets = downstream + logits
    groups, links = [], []
    for g, labels in enumerate(PLANTED_LABELS):
        pattern = [rng.gauss(0, 1) for _ in targets]
        members = []
        for m, label in enumerate(labels):
            node_id = f"{1 + m % 2}_{10 * g + m}_3"
            members.append(node_id)
            nodes.append(node(node_id, "cross layer transcoder", str(1 + m % 2), 3, label, 0.1 + 0.01 * len(links)))
            scale = rng.uniform(0.5, 2.0)
            for t, w in zip(targets, pattern, strict=True):
                links.append({"source": node_id, "target": t, "weight": scale * (w + rng.gauss(0, 0.05))})
        groups.append(set(members))
    for k in range(6):
        node_id = f"{k % 3}_{50 + k}_{3 if k < 4 else 2}"
        nodes.append(node(node_id, "cross layer transcoder", str(k % 3), 3 if k < 4 else 2, f"distractor {k}", 0.2))
        links += [{"source": node_id, "target": t, "weight": rng.gauss(0, 1)} for t in targets]
    for n in nodes:
        if n["feature_type"] == "cross layer transcoder":
            links.append({"source": f"E_{10 + n['ctx_idx']}_{n['ctx_idx']}", "target": n["node_id"], "weight": 0.3})
    metadata = {"slug": "planted", "scan": "x", "prompt": "".join(tokens), "prompt_tokens": tokens}
    metadata.update(schema_version=2, pruning_settings={"node_threshold": 0.8, "edge_threshold": 0.98})
    graph = {"metadata": metadata, "qParams": {"pinnedIds": [], "supernodes": []}, "nodes": nodes, "links": links}
    return graph | {"groups": groups}


def test_proposed_clusters_recover_planted_groups_with_names_from_their_labels(tmp_path):
    from clt_forge.serve.proposals import propose, suggest_name

    for seed in range(5):
        graph = planted_graph(seed)
        groups = graph.pop("groups")
        view = GraphView(graph["nodes"], graph["links"], exact=False)
        features = [n["node_id"] for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
        for pinned in ([], features):  # the most influential features, or the pinned ones
            found = propose(view, pinned, [])
            assert sorted(sorted(p.members) for p in found) == sorted(sorted(g) for g in groups), seed
    names = {p.name for p in propose(view, [], [])}
    assert names == {"paris", "france", "capital"}
    assert suggest_name(["about cats", "dogs"]) == "about cats"
    assert propose(view, [], [Cluster("paris", ("x",))])[0].name != "paris", "no name taken twice"


def test_the_subgraph_lays_pinned_nodes_out_by_layer_with_clusters_as_one_node():
    from clt_forge.serve.subgraph import subgraph_drawing

    graph = planted_graph()
    view = GraphView(graph["nodes"], graph["links"], exact=False)
    group = sorted(graph["groups"][0])
    pinned = [*group, "3_0_3", "5_100_3", "missing_1_1"]
    drawing = subgraph_drawing(view, pinned, [Cluster("paris", tuple(group))], 4, graph["metadata"]["prompt_tokens"])
    ids = [b["id"] for b in drawing["nodes"]]
    assert sorted(ids) == ["3_0_3", "5_100_3", "cluster:paris"]
    assert [b["id"] for b in sorted(drawing["nodes"], key=lambda b: b["y"])] == ["5_100_3", "3_0_3", "cluster:paris"]
    summed = sum(link["weight"] for link in graph["links"] if link["source"] in group and link["target"] == "3_0_3")
    drawn = {(link["source"], link["target"]): link["weight"] for link in drawing["links"]}
    assert drawn[("cluster:paris", "3_0_3")] == pytest.approx(summed)
    assert set(drawn) == {("cluster:paris", "3_0_3"), ("cluster:paris", "5_100_3")}, "only links among pinned nodes"


OVERLAPS = """() => {
    const boxes = window.cy.nodes().not('.axis').map(n => n.boundingBox({includeLabels: false}));
    let overlaps = 0;
    for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
        const a = boxes[i], b = boxes[j];
        if (a.x1 < b.x2 - 1 && b.x1 < a.x2 - 1 && a.y1 < b.y2 - 1 && b.y1 < a.y2 - 1) overlaps++;
    }
    return overlaps;
}"""
LABELS_DRAWN = """() => window.cy.nodes('.feature').filter(n => n.data('label') && n.visible()
    && parseFloat(n.renderedStyle('font-size')) >= parseFloat(n.style('min-zoomed-font-size'))).length"""

# labels Cytoscape draws (font size x the zoom rounded up to a power of two >= min-zoomed-font-size),
# their size on screen, and their width measured in the node's font against the box's
LABELS = """() => {
    const cy = window.cy, scale = Math.pow(2, Math.ceil(Math.log2(cy.zoom())));
    const pen = document.createElement('canvas').getContext('2d');
    return cy.nodes().not('.axis').filter(n => n.data('label')).map(n => {
        const size = parseFloat(n.style('font-size'));
        pen.font = `${n.style('font-weight')} ${size}px ${n.style('font-family')}`;
        return {id: n.id(), drawn: size * scale >= parseFloat(n.style('min-zoomed-font-size')),
                px: parseFloat(n.renderedStyle('font-size')), width: pen.measureText(n.data('label')).width,
                box: n.data('w')};
    });
}"""


@pytest.fixture(scope="module")
def planted_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    graph = planted_graph()
    graph.pop("groups")
    (folder / "planted.json").write_text(json.dumps(graph))
    with launch_interface(folder / "planted.json", port=0, block=False, cache_dir=folder / "cache", threads=1) as ui:
        yield ui, folder / "planted.json"


@pytest.mark.slow
def test_main_view_boxes_never_overlap_and_show_their_labels(made, server, web):
    ready = open_graph(web, server.url)
    assert web.evaluate(OVERLAPS) == 0
    assert web.evaluate(LABELS_DRAWN) > 0, "feature labels are drawn at the fitted zoom"
    labels = web.evaluate(LABELS)
    drawn = [label for label in labels if label["drawn"]]
    assert len(drawn) >= 0.8 * len([label for label in labels if not label["id"].count("_-1_")]), "most are drawn"
    assert min(label["px"] for label in drawn) >= 10, "at a legible size"
    assert all(label["width"] <= label["box"] - 2 for label in labels), "inside their boxes"
    axis = web.evaluate("parseFloat(window.cy.getElementById('axis:0').renderedStyle('font-size'))")
    assert axis >= 10, "axis labels legible at 1400x900"
    shot(web, "09-main-view")
    assert ready["nodes"] > 0


@pytest.mark.slow
def test_pins_subgraph_and_an_accepted_proposal_survive_a_reload(planted_server, web):
    ui, path = planted_server
    open_graph(web, ui.url)
    assert web.evaluate(OVERLAPS) == 0
    assert web.evaluate(LABELS_DRAWN) == 25, "every feature's label is drawn"
    at = web.evaluate("(id) => window.cltServe.nodePosition(id)", "1_0_3")
    web.mouse.move(at["x"], at["y"])
    web.wait_for_function("window.cy.$('.dim').length > 0", timeout=5_000)
    near = web.evaluate("window.cy.getElementById('1_0_3').closedNeighborhood().filter('.dim').length")
    assert near == 0, "the hovered node, its links and their ends are not dimmed"
    web.mouse.move(3, 3)
    web.wait_for_function("window.cy.$('.dim').length === 0", timeout=5_000)
    web.fill("#search", "paris")
    web.wait_for_selector(".search-hit", timeout=5_000)
    assert web.locator(".search-hit").count() == 4  # three features and the logit " Paris"
    web.locator(".search-hit[data-node='1_0_3'] .pin-btn").click()
    web.wait_for_function("window.cltServe.subgraph && window.cltServe.subgraph.nodes === 1", timeout=10_000)
    features = [n["node_id"] for n in planted_graph()["nodes"] if n["feature_type"] == "cross layer transcoder"]
    web.evaluate("(ids) => window.cltServe.pin(ids)", [*features, "5_100_3"])
    web.wait_for_function("window.cltServe.subgraph.nodes === 26", timeout=10_000)
    web.wait_for_selector("text=26 pinned; saved to planted.json", timeout=10_000)
    assert json.loads(path.read_text())["qParams"]["pinnedIds"][0] == "1_0_3"
    web.click("#propose")
    web.wait_for_selector("[data-proposal='2']", timeout=10_000)
    names = web.locator("#proposal-list [data-proposal] input").evaluate_all("inputs => inputs.map(i => i.value)")
    assert sorted(names) == ["capital", "france", "paris"], "named from the members' labels"
    paris = f"#proposal-list [data-proposal='{names.index('paris')}']"
    web.fill(f"{paris} input", "says Paris")  # edited before accepting
    web.click(f"{paris} button:has-text('Accept')")
    web.wait_for_selector("[data-cluster='says Paris']", timeout=10_000)
    web.wait_for_function("window.cltServe.subgraph.nodes === 24", timeout=10_000)  # three members: one node
    saved = json.loads(path.read_text())
    [[title, *members]] = saved["qParams"]["supernodes"]
    assert title == "says Paris" and sorted(members) == ["1_0_3", "1_2_3", "2_1_3"]
    jsonschema.validate(saved, SCHEMA)
    assert web.locator("#proposal-list [data-proposal]").count() == 2
    shot(web, "10-accepted-proposal")

    web.reload()
    web.wait_for_function(
        "window.cltServe.ready && window.cltServe.subgraph && window.cltServe.subgraph.nodes", timeout=60_000
    )
    assert web.evaluate("window.cltServe.subgraph.nodes") == 24, "pins and the cluster survive a reload"
    boxes = web.locator("#subgraph .sub-node").evaluate_all(
        "gs => gs.map(g => { const r = g.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })"
    )
    assert not [
        (a, b)
        for i, a in enumerate(boxes)
        for b in boxes[i + 1 :]
        if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
    ], "subgraph boxes do not overlap"
    assert web.locator("#subgraph .sub-label").all_text_contents().count("says Paris (3)") == 1
    summed = sum(
        link["weight"]
        for link in saved["links"]
        if link["source"] in ("1_0_3", "2_1_3", "1_2_3") and link["target"] == "5_100_3"
    )
    drawn = web.evaluate(
        "() => +document.querySelector(\"#subgraph line[data-source='cluster:says Paris'][data-target='5_100_3']\").dataset.weight"
    )
    assert drawn == pytest.approx(summed, rel=1e-6)
    # steering from the subgraph: clicking the cluster makes it the intervention target
    web.locator("#subgraph .sub-node[data-node='cluster:says Paris']").click()
    web.wait_for_selector("#panel [data-node='cluster:says Paris']", timeout=10_000)
    web.wait_for_function("document.querySelector('#target').innerText.includes('says Paris')", timeout=10_000)
    shot(web, "11-subgraph")
