"""`clt serve` on dense graphs: the main view's grid, labels, collapsed clusters and hovering.

The layout is checked on generated graphs (benchmarks/serve.py's synthetic graphs: 30 layers,
12 positions, hundreds to thousands of nodes, and a graph with one very crowded cell): every
box stays inside its layer's band and its position's column, no two boxes overlap, labels fit
their boxes and are legible where there is room. In the browser (Debian's Chromium driven by
Playwright) a 400-node graph is opened at 1400x900: the boxes Cytoscape draws do not overlap
and stay in their bands, the labels drawn are at least 10 px, and hovering a node lights its
inputs and outputs and dims the rest. Screenshots go to test-artifacts/serve/ (git-ignored).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math

import pytest
import test_serve
from test_serve import LABELS, OVERLAPS, REPO, open_graph, planted_graph, shot

from clt_forge.artifacts.graph import ERROR, Cluster
from clt_forge.serve import launch_interface
from clt_forge.serve.clusters import collapse
from clt_forge.serve.grid import CHAR_W, Grid, grid, row_of
from clt_forge.serve.layout import box_label, elements, fitted_label
from clt_forge.serve.pruning import GraphView
from clt_forge.serve.style import LEGIBLE
from clt_forge.serve.subgraph import CHARS, PER_LINE, subgraph_drawing

N_LAYERS, N_POS = 30, 12
chromium, web = test_serve.chromium, test_serve.web  # the browser fixtures of the other browser tests


def synthetic_graph(n_nodes: int, seed: int = 0) -> dict:
    """benchmarks/serve.py's graph of about `n_nodes` nodes (30 layers, 12 positions, 3 links a node)."""
    spec = importlib.util.spec_from_file_location("serve_benchmark", REPO / "benchmarks" / "serve.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.synthetic_graph(n_nodes, seed)


def crowded_graph() -> dict:
    """The 300-node synthetic graph with 40 more features in one cell (layer 5, position 3)."""
    graph = synthetic_graph(300, seed=1)
    for k in range(40):
        node_id = f"5_{900_000 + k}_3"
        graph["nodes"].append(
            {"node_id": node_id, "feature": 900_000 + k, "layer": "5", "ctx_idx": 3, "jsNodeId": node_id}
            | {"feature_type": "cross layer transcoder", "clerp": f"crowded {k}", "influence": 0.5, "activation": 1.0}
        )
    return graph


def overlapping(boxes: list[tuple[str, float, float, float, float]], gap: float) -> list[tuple[str, str]]:
    """Pairs of boxes (id, x1, y1, x2, y2) closer than `gap` px on both axes (a sweep along x)."""
    found, ordered = [], sorted(boxes, key=lambda b: b[1])
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if b[1] >= a[3] + gap:
                break
            if b[2] < a[4] + gap and a[2] < b[4] + gap:
                found.append((a[0], b[0]))
    return found


def check_grid(nodes: list[dict], layout: Grid) -> None:
    """Every box in its band and its column's cell, and at least 2 px from every other box."""
    edges = [0.0]
    for x in layout.col_x:
        edges.append(2 * x - edges[-1])
    corners = []
    for node in nodes:
        box = layout.boxes[node["node_id"]]
        top, bottom = layout.bands[row_of(node, N_LAYERS)]
        assert top <= box.y - box.h / 2 and box.y + box.h / 2 <= bottom, f"{node['node_id']} leaves its band"
        left, right = edges[node["ctx_idx"]], edges[node["ctx_idx"] + 1]
        assert left <= box.x - box.w / 2 and box.x + box.w / 2 <= right, f"{node['node_id']} leaves its column"
        corners.append((node["node_id"], box.x - box.w / 2, box.y - box.h / 2, box.x + box.w / 2, box.y + box.h / 2))
    assert not overlapping(corners, gap=2.0)


@pytest.mark.parametrize("make", [lambda: synthetic_graph(231), lambda: synthetic_graph(1000), crowded_graph])
def test_boxes_stay_in_their_layer_band_and_column_and_never_overlap(make):
    graph = make()
    layout = grid(graph["nodes"], N_LAYERS, N_POS)
    check_grid(graph["nodes"], layout)
    bands = sorted(layout.bands.values())
    assert all(a[1] <= b[0] + 1e-9 for a, b in itertools.pairwise(bands)), "bands do not overlap"
    assert layout.width == pytest.approx(860) and layout.height == pytest.approx(616), "fills a 1400x900 view"
    crowded = [layout.boxes[f"5_{900_000 + k}_3"] for k in range(40)] if make is crowded_graph else []
    assert len({round(b.y) for b in crowded}) != 40, "a crowded cell spreads sideways, not into a tower"


def test_labels_fit_their_boxes_and_are_legible_where_there_is_room():
    for graph, least in ((synthetic_graph(231), 0.5), (synthetic_graph(1000), 0.05), (planted_graph(), 1.0)):
        graph.pop("groups", None)
        tokens = graph["metadata"]["prompt_tokens"]
        layout = grid(graph["nodes"], N_LAYERS if len(tokens) == N_POS else 4, len(tokens))
        legible = 0
        labelled = [n for n in graph["nodes"] if n["feature_type"] != ERROR]
        for node in labelled:
            box = layout.boxes[node["node_id"]]
            text, size = fitted_label(box_label(node, tokens), box)
            assert len(text) * CHAR_W * size <= box.w - 4 + 1e-6, "the label fits its box"
            assert size <= 0.7 * box.h + 1e-6
            assert text == box_label(node, tokens) or text.endswith("…")
            legible += size >= LEGIBLE
        assert legible >= least * len(labelled), (legible, len(labelled))
    # the planted graph: every label drawn whole at 11 px
    node = next(n for n in graph["nodes"] if n["node_id"] == "1_0_3")
    assert fitted_label(box_label(node, tokens), layout.boxes["1_0_3"]) == ("says Paris", 11.0)


def test_a_collapsed_cluster_takes_one_of_its_members_boxes():
    graph = synthetic_graph(400)
    layout = grid(graph["nodes"], N_LAYERS, N_POS)
    features = [n["node_id"] for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    clusters = [Cluster("far apart", (features[0], features[1], features[2])), Cluster("two", tuple(features[5:7]))]
    nodes, links = collapse(GraphView(graph["nodes"], graph["links"], exact=False), clusters)
    drawn = elements(nodes, links, layout, n_layers=N_LAYERS, prompt_tokens=graph["metadata"]["prompt_tokens"],
                     clusters=clusters)  # fmt: skip
    boxes = [e for e in drawn if "position" in e and "axis" not in e.get("classes", "")]
    member_boxes = {(b.x, b.y, b.w, b.h) for b in (layout.boxes[m] for m in features[:3])}
    cluster = next(e for e in boxes if e["data"]["id"] == "cluster:far apart")
    assert (
        cluster["position"]["x"],
        cluster["position"]["y"],
        cluster["data"]["w"],
        cluster["data"]["h"],
    ) in member_boxes
    corners = [
        (e["data"]["id"], e["position"]["x"] - e["data"]["w"] / 2, e["position"]["y"] - e["data"]["h"] / 2,
         e["position"]["x"] + e["data"]["w"] / 2, e["position"]["y"] + e["data"]["h"] / 2)
        for e in boxes
    ]  # fmt: skip
    assert not overlapping(corners, gap=2.0)


def test_subgraph_clusters_never_overlap_other_boxes_and_rows_wrap():
    graph = planted_graph()
    groups = [sorted(g) for g in graph.pop("groups")]
    view = GraphView(graph["nodes"], graph["links"], exact=False)
    features = [n["node_id"] for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    # clusters across layers 1 and 2 (their mean row is between layers), one with a long name,
    # one of a single layer (its row is a layer's own)
    clusters = [
        Cluster("a cluster with a very long name indeed", tuple(groups[0])),
        Cluster("france", tuple(groups[1])),
        Cluster("downstream pair", ("3_0_3", "3_1_3")),
    ]
    drawing = subgraph_drawing(view, [*features, "5_100_3", "E_13_3"], clusters, 4, graph["metadata"]["prompt_tokens"])
    boxes = drawing["nodes"]
    assert {"cluster:france", "cluster:downstream pair"} <= {b["id"] for b in boxes}
    corners = [
        (b["id"], b["x"] - b["w"] / 2, b["y"] - b["h"] / 2, b["x"] + b["w"] / 2, b["y"] + b["h"] / 2) for b in boxes
    ]
    assert not overlapping(corners, gap=10.0)
    assert all(len(b["label"]) <= CHARS for b in boxes)
    long = next(b for b in boxes if b["id"].startswith("cluster:a cluster"))
    assert long["label"].endswith("… (3)"), "the count stays when a long name is cut"
    downstream = [b for b in boxes if b["id"].startswith("3_")]
    assert len({b["y"] for b in downstream}) == math.ceil(len(downstream) / PER_LINE), "a full row wraps"
    x0, y0, width, height = drawing["viewBox"]
    assert all(x0 <= c[1] and c[3] <= x0 + width and y0 <= c[2] and c[4] <= y0 + height for c in corners)


# ---- in the browser: a 400-node graph at 1400x900 ------------------------------------------------

IN_BANDS = """() => window.cy.nodes().not('.axis').filter(n => {
    const box = n.boundingBox({includeLabels: false}), band = window.cy.getElementById('axis:' + n.data('row'));
    return !(band.data('y0') <= box.y1 + 1.5 && box.y2 - 1.5 <= band.data('y1'));
}).map(n => n.id())"""


@pytest.fixture(scope="module")
def dense_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    graph = synthetic_graph(400)
    (folder / "dense.json").write_text(json.dumps(graph))
    with launch_interface(folder / "dense.json", port=0, block=False, cache_dir=folder / "cache", threads=1) as ui:
        yield ui, graph


@pytest.mark.slow
def test_a_dense_graph_keeps_boxes_apart_in_their_bands_with_legible_labels(dense_server, web):
    ui, graph = dense_server
    ready = open_graph(web, ui.url)
    assert 350 <= ready["nodes"] <= len(graph["nodes"]), "hundreds of nodes drawn"
    assert web.evaluate(OVERLAPS) == 0
    assert web.evaluate(IN_BANDS) == []
    labels = web.evaluate(LABELS)
    drawn = [label for label in labels if label["drawn"]]
    assert len(drawn) >= 100, f"{len(drawn)} of {len(labels)} labels drawn at the fitted zoom"
    assert min(label["px"] for label in drawn) >= 10, "labels drawn are legible"
    assert all(label["width"] <= label["box"] - 2 for label in labels), "labels never leave their box"
    assert sum(label["width"] > label["box"] / 2 for label in labels) > 100, "and fill it"
    axis = web.evaluate("window.cy.nodes('.axis').not('.band').map(n => parseFloat(n.renderedStyle('font-size')))")
    assert min(axis) >= 10, "axis labels legible at 1400x900"
    shot(web, "12-dense-main-view")


@pytest.mark.slow
def test_hovering_a_node_of_a_dense_graph_lights_its_inputs_and_outputs_and_dims_the_rest(dense_server, web):
    ui, _ = dense_server
    open_graph(web, ui.url)
    node_id = web.evaluate(
        """() => window.cy.nodes('.feature').filter(n => n.incomers('edge').length && n.outgoers('edge').length)
            .sort((a, b) => b.degree() - a.degree())[0].id()"""
    )
    at = web.evaluate("(id) => window.cltServe.nodePosition(id)", node_id)
    web.mouse.move(at["x"], at["y"])
    web.wait_for_function("window.cy.$('.dim').length > 0", timeout=5_000)
    seen = web.evaluate(
        """(id) => { const cy = window.cy, node = cy.getElementById(id), near = node.closedNeighborhood();
            const inputs = node.incomers('node'), outputs = node.outgoers('node');
            return {
                inputs: inputs.length, outputs: outputs.length,
                lit: near.filter('.dim').length, near: near.nodes().not(node).filter('.near').length,
                nearAll: near.nodes().length - 1, node: node.hasClass('dim') || node.hasClass('near'),
                others: cy.nodes().not('.axis').not(near).length,
                othersDim: cy.nodes().not('.axis').not(near).filter('.dim').length,
                edgesDim: cy.edges().not(near).filter('.dim').length, edgesOther: cy.edges().not(near).length,
                axesDim: cy.nodes('.axis').filter('.dim').length,
            }; }""",
        node_id,
    )
    assert seen["inputs"] >= 1 and seen["outputs"] >= 1
    assert seen["lit"] == 0, "the node, its links, its inputs and its outputs are not dimmed"
    assert seen["near"] == seen["nearAll"], "its inputs and outputs are marked"
    assert not seen["node"]
    assert seen["others"] > 300 and seen["othersDim"] == seen["others"], "every other node is dimmed"
    assert seen["edgesDim"] == seen["edgesOther"], "every other link is dimmed"
    assert seen["axesDim"] == 0
    assert web.evaluate(OVERLAPS) == 0, "hovering moves nothing"
    shot(web, "13-dense-hover")
    web.mouse.move(3, 3)
    web.wait_for_function("window.cy.$('.dim').length === 0", timeout=5_000)
