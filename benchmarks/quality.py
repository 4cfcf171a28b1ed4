"""How good a CLT the training recipe makes at a fixed budget: train, evaluate, print JSON.

One run trains a CLT on a fixed cached dataset of the embedded model (the demo's: 65,536
tokens of data=bundled, cached once into --out and reused) with the demo's recipe plus any
train overrides given, for a budget of tokens (default: the demo's step count) or wall time,
then measures:
  held_out    EV / NMSE / L0 per layer, mean / median / worst, dead features, on the dataset's
              held-out tokens (documents never trained on) cached unquantized, whatever --quant
              says: a quantized target would charge the CLT for the codec's error too;
  modern      the same on held-out modern English (data=python_docs' held-out documents:
              Python's documentation, cached once; a corpus without modern text never saw any);
  replacement the replacement model (clt_forge/evaluation/replacement.py) on held-out windows:
              next-token KL and top-1 agreement with every MLP replaced, and one layer at a time;
  graphs      mean replacement / completeness score of the attribution graphs of the prompts in
              benchmarks/quality_prompts.txt (how they were chosen: docs/quality.md), each
              attributing the demo's max_feature_nodes (--max-feature-nodes N: N instead).

    .venv/bin/python benchmarks/quality.py                         # the demo budget, demo recipe
    .venv/bin/python benchmarks/quality.py normalization=mean_norm sparsity.l0_coefficient=2
    .venv/bin/python benchmarks/quality.py --budget long           # ~60 min of training
    .venv/bin/python benchmarks/quality.py --minutes 10            # a wall-time budget
    .venv/bin/python benchmarks/quality.py --sweep --no-graphs     # EV vs L0 x quant none/int8/int4
    .venv/bin/python benchmarks/quality.py --grid normalization=rms,mean_norm --grid sparsity.l0_coefficient=1,4

--grid KEY=V1,V2 (repeatable) trains every combination; --sweep is the standard grid (three
sparsity coefficients x quant none / int8 / int4). Each run's JSON also goes to --out/results/.
A wall-time budget is turned into a step count from a short timed calibration run, so the
learning-rate and sparsity schedules still see their whole length.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import clt_forge  # noqa: E402, F401  (its import sets THP_MEM_ALLOC_ENABLE before torch allocates, as `clt` runs)

PROMPTS = ROOT / "benchmarks" / "quality_prompts.txt"
SWEEP_L0 = ("0.5", "1", "3")  # sparsity.l0_coefficient: ~25, ~18, ~10 active features per layer today
SWEEP_QUANTS = ("none", "int8", "int4")
BUDGETS: dict[str, dict[str, Any]] = {
    "demo": {"cache": 65_536, "steps": 256},
    "long": {"cache": 196_608, "minutes": 60.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="clt train overrides on top of the demo's recipe")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="demo")
    parser.add_argument("--tokens", type=int, help="training tokens (instead of the budget's)")
    parser.add_argument("--minutes", type=float, help="training wall time (instead of the budget's)")
    parser.add_argument("--quant", default="int8", help="quant of the cached dataset")
    parser.add_argument("--sweep", action="store_true", help="sparsity x quant grid")
    parser.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (repeatable)")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false", help="skip the graph scores")
    parser.add_argument("--prompts", type=int, default=0, help="only the first N graph prompts (0: all)")
    parser.add_argument("--max-feature-nodes", type=int, help="feature nodes per graph (default: the demo's)")
    parser.add_argument("--per-layer-windows", type=int, default=4, help="windows for one-layer-replaced")
    parser.add_argument("--windows", type=int, default=16, help="held-out windows for the replacement model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "quality")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    grid = [arg.split("=", 1) for arg in args.grid]
    if args.sweep:
        grid += [["sparsity.l0_coefficient", ",".join(SWEEP_L0)], ["quant", ",".join(SWEEP_QUANTS)]]
    runs = [
        dict(zip((k for k, _ in grid), values, strict=True))
        for values in itertools.product(*(v.split(",") for _, v in grid))
    ]
    results = []
    for point in runs or [{}]:
        quant = point.pop("quant", args.quant)
        overrides = [*args.overrides, *(f"{k}={v}" for k, v in point.items())]
        results.append(benchmark(args, quant, overrides))
        print(json.dumps(results[-1]), flush=True)
    if len(results) > 1:
        print(json.dumps({"frontier": frontier(results)}))


def benchmark(args: argparse.Namespace, quant: str, overrides: list[str]) -> dict[str, Any]:
    budget = BUDGETS[args.budget]
    dataset = ensure_dataset(args.out / f"data-{quant}-{budget['cache']}", quant, budget["cache"], args.threads)
    modern = ensure_dataset(args.out / "modern", "none", 1024, args.threads, data="python_docs")
    # the same held-out tokens, unquantized (a quant=none dataset holds them already)
    exact = dataset if quant == "none" else ensure_dataset(args.out / "exact", "none", 1024, args.threads)
    name = run_name(args.budget, quant, overrides, args.tokens, args.minutes)
    folder = args.out / "runs" / name
    steps, calibration = budget_steps(args, budget, dataset, overrides)
    started = time.perf_counter()
    config = train(dataset, folder, overrides, steps, args.threads)
    train_seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "name": name,
        "budget": args.budget,
        "quant": quant,
        "overrides": overrides,
        "steps": config.tokens // config.batch_size,  # the budget's tokens at the run's own batch size
        "batch_size": config.batch_size,
        "tokens": config.tokens,
        "train_seconds": round(train_seconds, 1),
        "calibration_s_per_step": calibration,
        **evaluate(folder / "checkpoints" / "final", exact, modern, config, args),
        "machine": machine(),
    }
    (args.out / "results").mkdir(parents=True, exist_ok=True)
    (args.out / "results" / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_name(budget: str, quant: str, overrides: list[str], tokens: int | None, minutes: float | None) -> str:
    """Names a run by everything that decides it, the demo's recipe included (a changed recipe
    never reuses a run trained with the old one)."""
    from clt_forge.config.compose import load_config
    from clt_forge.config.plain import plain

    key = json.dumps([budget, quant, overrides, tokens, minutes, plain(load_config("demo"))], default=str)
    return f"{budget}-{quant}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def recipe(dataset: Path, folder: Path, overrides: list[str], steps: int, threads: int) -> Any:
    """The demo's training recipe (conf/demo.yaml and DemoConfig's defaults), then `overrides`
    (a key given there replaces the recipe's)."""
    from clt_forge.config.compose import load_config

    demo = load_config("demo")
    base = [
        f"activations={dataset}",
        f"out={folder}",
        f"tokens={steps * demo.batch_size}",
        f"batch_size={demo.batch_size}",
        f"optim.lr={demo.lr}",
        f"layer_weights={list(demo.layer_weights)}",
        "optim.lr_schedule=cosine",
        f"clt.d_features={demo.clt.d_features}",
        f"sparsity={demo.sparsity.schedule}",
        *(f"sparsity.{f.name}={getattr(demo.sparsity, f.name)}" for f in dataclasses.fields(demo.sparsity)),
        f"eval_every={max(1, steps // 8)}",
        "log_every=16",
        f"checkpoint_every={steps + 1}",
        f"threads={threads}",
    ]
    given = {item.split("=", 1)[0].lstrip("+") for item in overrides}
    base = [item for item in base if not item.startswith("sparsity.schedule=") and item.split("=", 1)[0] not in given]
    if any(item.startswith("sparsity=") for item in overrides):  # another schedule: its own fields
        base = [item for item in base if not item.startswith("sparsity")]
    return load_config("train", *base, *overrides)


def train(dataset: Path, folder: Path, overrides: list[str], steps: int, threads: int) -> Any:
    from clt_forge.training.runner import CLTTrainingRunner

    config = recipe(dataset, folder, overrides, steps, threads)
    if not (folder / "checkpoints" / "final" / "config.json").is_file():
        if folder.exists():
            import shutil

            shutil.rmtree(folder)  # an interrupted run: start it again (a benchmark times whole runs)
        CLTTrainingRunner(config).run()
    return config


def budget_steps(
    args: argparse.Namespace, budget: dict[str, Any], dataset: Path, overrides: list[str]
) -> tuple[int, float | None]:
    """Steps of the budget; a wall-time budget is timed from a 24-step run (its mean step time)."""
    from clt_forge.config.compose import load_config

    batch = load_config("demo").batch_size
    if args.tokens:
        return max(1, args.tokens // batch), None
    minutes = args.minutes or budget.get("minutes")
    if not minutes:
        return int(budget["steps"]), None
    folder = args.out / "calibration" / run_name("calibration", dataset.name, overrides, None, None)
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    train(dataset, folder, [*overrides, "log_every=8", "eval_every=1000"], 24, args.threads)
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    speed = [row["tokens_per_s"] for row in lines if row.get("kind") == "train"][-1]
    per_step = batch / speed
    return max(1, int(minutes * 60 / per_step)), round(per_step, 4)


def ensure_dataset(folder: Path, quant: str, tokens: int, threads: int, data: str = "bundled") -> Path:
    from clt_forge.artifacts.activations import MANIFEST

    if not (folder / MANIFEST).is_file():
        from clt_forge.config.compose import load_config
        from clt_forge.stages import cache

        cache.run(
            load_config(
                "cache", f"out={folder}", f"quant={quant}", f"data={data}", f"tokens={tokens}",
                "held_out_tokens=2048", f"threads={threads}",
            )
        )  # fmt: skip
    return folder


def evaluate(checkpoint: Path, dataset: Path, modern: Path, config: Any, args: argparse.Namespace) -> dict[str, Any]:
    from clt_forge.artifacts.checkpoint import load_checkpoint
    from clt_forge.data.windows import token_windows
    from clt_forge.evaluation.held_out import held_out_metrics
    from clt_forge.evaluation.replacement import replacement_scores
    from clt_forge.models import load_model

    clt, normalization, _ = load_checkpoint(checkpoint)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "held_out": held_out_metrics(clt, normalization, dataset / "held_out"),
        "modern": held_out_metrics(clt, normalization, modern / "held_out"),
    }
    model = load_model(config.model)
    windows = list(itertools.islice(token_windows(config.data, model.tokenizer, split="held_out"), args.windows))
    import torch

    everything = replacement_scores(model, clt, normalization, torch.stack(windows), per_layer=False)
    one_at_a_time = replacement_scores(model, clt, normalization, torch.stack(windows[: args.per_layer_windows]))
    result["replacement"] = {
        "kl": everything.kl,
        "top1": everything.top1,
        "positions": everything.positions,
        "layer_kl": one_at_a_time.layer_kl,
        "layer_top1": one_at_a_time.layer_top1,
        "worst_layers": one_at_a_time.worst_layers(5),
        "per_layer_positions": one_at_a_time.positions,
    }
    del model
    gc.collect()
    if args.graphs:
        result["graphs"] = graph_scores(checkpoint, args.prompts, args.max_feature_nodes)
    result["eval_seconds"] = round(time.perf_counter() - started, 1)
    return result


def graph_scores(checkpoint: Path, limit: int = 0, max_feature_nodes: int | None = None) -> dict[str, Any]:
    from clt_forge.attribution.runner import AttributionRunner
    from clt_forge.config.compose import load_config

    nodes = max_feature_nodes or load_config("demo").max_feature_nodes
    settings = load_config("attribute", f"checkpoint={checkpoint}", f"max_feature_nodes={nodes}")
    runner = AttributionRunner(checkpoint, settings=settings)
    prompts = [line for line in PROMPTS.read_text().splitlines() if line.strip()][: limit or None]
    per_prompt: list[dict[str, Any]] = []
    for prompt in prompts:
        result = runner.run(prompt)
        per_prompt.append(
            {"prompt": prompt, "replacement": result.replacement_score, "completeness": result.completeness_score}
        )
    del runner
    gc.collect()
    return {
        "replacement": sum(p["replacement"] for p in per_prompt) / len(per_prompt),
        "completeness": sum(p["completeness"] for p in per_prompt) / len(per_prompt),
        "max_feature_nodes": nodes,
        "prompts": per_prompt,
    }


def frontier(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """EV vs L0 per quant, sorted by L0: the figure the recipe is judged by."""
    rows = [
        {
            "quant": r["quant"],
            "overrides": r["overrides"],
            "l0_mean": round(r["held_out"]["l0_mean"], 2),
            "ev_mean": round(r["held_out"]["ev_mean"], 4),
            "ev_worst": round(r["held_out"]["ev_worst"], 4),
            "modern_ev": round(r["modern"]["ev_mean"], 4),
            "kl": round(r["replacement"]["kl"], 4),
        }
        for r in results
    ]
    return sorted(rows, key=lambda row: (row["quant"], row["l0_mean"]))


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0], "loadavg": load}


if __name__ == "__main__":
    main()
