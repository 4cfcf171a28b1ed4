"""How close `clt attribute`'s cost estimate is to the run it describes: a random CLT on the
embedded model (about half its features active, like a briefly trained CLT), attributed once
with the given settings; prints the estimate and the measured wall time, CPU time and peak
memory beyond the loaded model as JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attribution_budget.py --d-features 1152 --batch 16 --nodes 32
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import psutil
import torch
from circuit_tracer import attribute

from clt_forge.artifacts.checkpoint import CheckpointInfo, save_checkpoint
from clt_forge.artifacts.normalization import Normalization
from clt_forge.attribution import budget
from clt_forge.attribution.runner import AttributionRunner
from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.config.plain import plain
from clt_forge.models.activations import hook_names
from clt_forge.models.loading import model_config

PROMPT = 'The opposite of "large" is "'


def random_clt(folder: Path, model: str, d_features: int) -> Path:
    cfg = model_config(model)
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(cfg.n_layers, cfg.d_model, d_features, jumprelu_threshold=0.05)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.2)
    norm = Normalization(torch.ones(cfg.n_layers), torch.ones(cfg.n_layers))
    info = CheckpointInfo(cfg.n_layers, cfg.d_model, d_features, 1.0, plain(cfg), hook_names(cfg.n_layers))
    return save_checkpoint(folder, clt, norm, info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--d-features", type=int, default=1152)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--nodes", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        runner = AttributionRunner(random_clt(Path(scratch) / "clt", args.model, args.d_features))
        ids = runner.tokens(PROMPT)
        shape = budget.prompt_shape(runner.model, ids)
        rates = budget.measure_rates(torch.device("cpu"), shape.d_model, shape.d_mlp)
        predicted = budget.estimate(shape, args.batch, args.nodes, 10, rates)
        before = psutil.Process().memory_info().rss
        wall, cpu = time.perf_counter(), time.process_time()
        attribute(torch.tensor(ids), runner.model, batch_size=args.batch, max_feature_nodes=args.nodes, verbose=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "model": args.model,
                "d_features": args.d_features,
                "batch_size": args.batch,
                "max_feature_nodes": args.nodes,
                "threads": torch.get_num_threads(),
                "active_features": shape.n_active,
                "n_pos": shape.n_pos,
                "rates": {"gflops": rates.flops / 1e9, "gather_gfloats": rates.gather / 1e9},
                "estimate": {"gib": predicted.peak_bytes / 2**30, "seconds": predicted.seconds},
                "measured": {"gib_beyond_model": (peak - before) / 2**30, "wall_s": wall, "cpu_s": cpu},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
