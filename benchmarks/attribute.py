"""Attribution wall time and peak memory on the embedded model (CPU).

    .venv/bin/python benchmarks/attribute.py [--checkpoint RUN/checkpoints/final] [--threads 2]

Attributes a 10-token prompt with max_feature_nodes 256 and 1024, each in a fresh process, and
splits the time into circuit-tracer's own work (attribute, prune_graph) and ours (loading the
checkpoint and folding the normalisation, configuring the replacement model, scores, building
and writing the graph JSON). Model loading is reported apart from both. Without --checkpoint a
random CLT at the embedded shape (d_features 1152) is used. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "The opposite of large is small, and the opposite"  # 10 tokens with BOS


def random_checkpoint(folder: Path, d_features: int) -> Path:
    from clt_forge.artifacts.checkpoint import CheckpointInfo, save_checkpoint
    from clt_forge.artifacts.normalization import Normalization
    from clt_forge.clt.model import CrossLayerTranscoder
    from clt_forge.config.plain import plain
    from clt_forge.models.activations import hook_names
    from clt_forge.models.loading import model_config

    cfg = model_config("smollm2_135m")
    clt = CrossLayerTranscoder(cfg.n_layers, cfg.d_model, d_features)
    norm = Normalization(torch.ones(cfg.n_layers), torch.ones(cfg.n_layers))
    info = CheckpointInfo(cfg.n_layers, cfg.d_model, d_features, 1.0, plain(cfg), hook_names(cfg.n_layers))
    return save_checkpoint(folder, clt, norm, info)


def measure(checkpoint: str, max_feature_nodes: int) -> dict[str, float]:
    import circuit_tracer.graph as ct_graph
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores

    from clt_forge.artifacts.checkpoint import read_info
    from clt_forge.artifacts.graph import graph_json
    from clt_forge.attribution.convert import to_circuit_tracer
    from clt_forge.attribution.replacement import replacement_model
    from clt_forge.models.loading import load_model, recorded_model_config

    times: dict[str, float] = {}
    clock = time.perf_counter
    start = clock()
    model = load_model(recorded_model_config(read_info(checkpoint).model))
    times["model_load_s"] = clock() - start

    start = clock()
    transcoder = to_circuit_tracer(checkpoint)
    times["convert_s"] = clock() - start
    start = clock()
    model = replacement_model(model, transcoder)
    times["replacement_model_s"] = clock() - start

    assert model.tokenizer is not None
    ids = [model.tokenizer.bos_token_id, *model.tokenizer(PROMPT, add_special_tokens=False).input_ids]
    start = clock()
    graph = attribute(torch.tensor(ids), model, max_feature_nodes=max_feature_nodes, batch_size=256, verbose=False)
    times["circuit_tracer_attribute_s"] = clock() - start

    start = clock()
    compute_graph_scores(graph)
    times["scores_s"] = clock() - start

    pruning = {"s": 0.0}
    original_prune = ct_graph.prune_graph

    def timed_prune(*args: object, **kwargs: object) -> object:
        begin = clock()
        result = original_prune(*args, **kwargs)  # type: ignore[arg-type]
        pruning["s"] += clock() - begin
        return result

    import clt_forge.artifacts.graph as module

    module.prune_graph = timed_prune  # type: ignore[assignment]
    start = clock()
    document = graph_json(graph, model.tokenizer, slug="bench")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "bench.json").write_text(json.dumps(document))
        graph.to_pt(str(Path(tmp) / "bench.pt"))
    times["circuit_tracer_prune_s"] = pruning["s"]
    times["graph_json_and_write_s"] = clock() - start - pruning["s"]
    times["tokens"] = len(ids)
    times["active_features"] = len(graph.active_features)
    times["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nodes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--probe", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(measure(args.checkpoint, args.probe)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(random_checkpoint(Path(tmp) / "ckpt", 1152))
        results = {}
        for nodes in args.nodes:
            command = [sys.executable, __file__, "--checkpoint", checkpoint, "--threads", str(args.threads)]
            done = subprocess.run([*command, "--probe", str(nodes)], capture_output=True, text=True, check=True)
            run = json.loads(done.stdout.strip().splitlines()[-1])
            ours = run["convert_s"] + run["replacement_model_s"] + run["scores_s"] + run["graph_json_and_write_s"]
            theirs = run["circuit_tracer_attribute_s"] + run["circuit_tracer_prune_s"]
            run["ours_s"], run["circuit_tracer_s"] = ours, theirs
            run["our_share_of_total"] = ours / (ours + theirs)
            results[f"max_feature_nodes_{nodes}"] = run
    print(
        json.dumps(
            {
                "checkpoint": args.checkpoint or "random CLT, d_features 1152",
                "threads": args.threads,
                "prompt": PROMPT,
                "target_our_share": 0.10,
                **results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
