"""`clt serve` opens the graph of an imported CLT (issue 20), without a browser.

A circuit-tracer-format CLT for `tiny` that reads hook_resid_mid (written by circuit-tracer's own
writer) is attributed by `clt attribute`'s runner; the serve app built from the graph then answers
as the page's script and Dash's renderer would ask it: the page and its layout, the callback that
opens the graph, the drawing routes, a feature's panel, and an intervention queued from the page,
run by the worker process on the model the graph records (an imported CLT records no model config
of ours: before, the worker failed with "ModelConfig has missing mandatory value: name").
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder as CTTranscoder

from clt_forge.artifacts.checkpoint import read_info
from clt_forge.models.loading import model_config

PROMPT = 'The opposite of "large" is "'


def imported_clt(folder: Path, d_features: int = 64) -> Path:
    """A random circuit-tracer CLT for tiny at hook_resid_mid -> hook_mlp_out, decoders loud
    enough that features, not only error nodes, survive pruning."""
    cfg = model_config("tiny")
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    ct = CTTranscoder(cfg.n_layers, d_features, cfg.d_model, "jump_relu", lazy_decoder=False, device=cpu)
    with torch.no_grad():
        ct.W_enc.normal_(0, cfg.d_model**-0.5)
        ct.b_enc.normal_(0, 0.2)
        ct.b_dec.zero_()
        for decoder in ct.W_dec:
            decoder.normal_(0, 0.5)
        ct.activation_function.threshold.uniform_(0.0, 0.2)
    ct.to(torch.float32).to_safetensors(str(folder))
    (folder / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"
    )
    return folder


def graph_of_an_imported_clt(root: Path) -> Path:
    from clt_forge.attribution.runner import AttributionRunner, AttributionSettings

    checkpoint = imported_clt(root / "ct")
    assert read_info(checkpoint).format == "circuit-tracer/clt"
    settings = AttributionSettings(max_feature_nodes=64, batch_size=64, node_threshold=0.9, verbose=False)
    runner = AttributionRunner(checkpoint, model_name="tiny", settings=settings)
    return runner.save(runner.run(PROMPT), root / "graphs")


def update(client: Any, dependencies: list[dict], output: str, inputs: dict, state: dict) -> dict:
    """Call the Dash callback whose outputs include `output` as the renderer does (POST
    /_dash-update-component), `inputs` / `state` given as {"id.property": value}; its response."""
    found = next(d for d in dependencies if output in d["output"].strip(".").split("..."))
    outputs = [
        dict(zip(("id", "property"), o.split("."), strict=True)) for o in found["output"].strip(".").split("...")
    ]

    def values(kind: list[dict], given: dict) -> list[dict]:
        return [{**item, "value": given.get(f"{item['id']}.{item['property']}")} for item in kind]

    body = {
        "output": found["output"],
        "outputs": outputs,
        "inputs": values(found["inputs"], inputs),
        "state": values(found["state"], state),
        "changedPropIds": list(inputs),
    }
    answer = client.post("/_dash-update-component", json=body)
    assert answer.status_code == 200, answer.get_data(as_text=True)[:2000]
    return answer.get_json()["response"]


def test_serve_opens_the_graph_of_an_imported_clt(tmp_path):
    from clt_forge.serve.app import build_app
    from clt_forge.serve.graphs import GraphLibrary
    from clt_forge.serve.jobs import InterventionQueue, read_jobs
    from clt_forge.serve.state import ServeState

    graph = graph_of_an_imported_clt(tmp_path)
    document = json.loads(graph.read_text())
    features = [n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert features, "the imported CLT's features survive pruning"
    assert document["metadata"]["checkpoint"] == str((tmp_path / "ct").resolve())
    assert document["metadata"]["model"] == "tiny"

    jobs = InterventionQueue(tmp_path / "cache" / "jobs", threads=1)
    try:
        client = build_app(ServeState(GraphLibrary(graph), jobs)).server.test_client()
        page = client.get("/")
        assert page.status_code == 200 and "clt serve" in page.get_data(as_text=True)
        layout = client.get("/_dash-layout")
        assert layout.status_code == 200 and layout.get_json()["props"]
        dependencies = client.get("/_dash-dependencies").get_json()

        opened = update(client, dependencies, "graph-meta.data", {"url.search": f"?graph={graph.name}"}, {})
        meta = opened["graph-meta"]["data"]
        assert meta["key"] == graph.name and "error" not in meta, meta
        assert opened["error-box"]["style"] == {"display": "none"}
        view = opened["rendered"]["data"]

        initial = client.get(f"/_clt/initial?graph={graph.name}").get_json()
        assert initial["key"] == graph.name and "error" not in initial
        drawn = {element["data"]["id"] for element in initial["elements"] if "source" not in element["data"]}
        shown = [n["node_id"] for n in features if n["node_id"] in drawn]
        assert shown, "the main view draws the imported CLT's features"
        elements = client.post("/_clt/elements", data=view).get_json()
        assert "error" not in elements and elements["nodes"] == initial["nodes"]

        panel = client.post("/_clt/panel", data=json.dumps({"view": view, "node": shown[0]}))
        text = panel.get_data(as_text=True)
        assert panel.status_code == 200 and "No panel" not in text
        layer, feature = shown[0].split("_")[:2]
        assert f"Feature L{layer} #{feature}" in re.sub(r"<[^>]+>", " ", text), text[:1000]

        # an intervention (the worker process builds the replacement model from the graph's record)
        asked = {"target.value": f"node:{shown[0]}", "mode.value": "scale", "amount.value": 0.0}
        context = {"graph-key.data": graph.name, "clusters.data": [], "jobs.data": []}
        queued = update(client, dependencies, "queue-status.children", {"queue.n_clicks": 1}, asked | context)
        numbers = queued["jobs"]["data"]
        deadline = time.monotonic() + 120
        while (job := read_jobs(jobs.folder, numbers)[0])["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline, f"the intervention did not finish in 120 s: {job}"
            time.sleep(0.2)
        assert job["status"] == "done", job.get("error")
        assert job["result"]["top_before"] and job["result"]["edits"]
    finally:
        jobs.stop()
