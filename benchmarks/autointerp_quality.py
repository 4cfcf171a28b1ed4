"""Label quality per explainer: mean score, mean control, share beating the control by 0.2, time.

    python benchmarks/autointerp_quality.py checkpoint=runs/demo/checkpoints/final features=16 \\
        tokens=16384 explainers=tokens,local,openai [threads=2] [seed=0] [scorer=token|context]
    python benchmarks/autointerp_quality.py checkpoint=runs/demo/checkpoints/final \
        database=runs/demo/features/features.db explainers=tokens   # an existing database's features
Any other KEY=VALUE is passed to `clt autointerp` (e.g. per_quantile=30).

One streaming pass (explainer=none) over `tokens` tokens for `features` random live features of the
checkpoint (seeded), then, for each explainer, a copy of that database explained and scored
(`clt autointerp` resumes after the pass). Per explainer: mean score and control, the share of
features beating the control by 0.2, time per feature, and how many labels quote a token absent
from the feature's top contexts (tokens.in_top_contexts; issue 19 asks for none). openai runs
against tests/openai_server.py's rule-based stand-in on 127.0.0.1 (its judge is that server too);
tokens and local by their default judge (literal, the rest SmolLM2-135M). With `database=`, no pass:
that database's collected features (every one) are explained and scored again, on a copy
(`save_pass=PATH` keeps a pass's database for that).
Prints one JSON object; docs/quality.md reports it.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

from omegaconf import OmegaConf

from clt_forge.artifacts.checkpoint import load_checkpoint
from clt_forge.artifacts.features import FeatureStore
from clt_forge.autointerp.labels import naming_absent_tokens
from clt_forge.autointerp.runner import AutoInterp
from clt_forge.config.compose import compose_stage

REPO = Path(__file__).resolve().parents[1]


OWN = {"features", "tokens", "explainers", "seed", "checkpoint", "threads", "scorer", "database", "save_pass"}


def args() -> dict[str, str]:
    out = {"features": "16", "tokens": "16384", "explainers": "tokens,local,openai", "seed": "0", "checkpoint": ""}
    out |= {"threads": "2", "scorer": "token", "database": "", "save_pass": ""}
    out |= dict(a.split("=", 1) for a in sys.argv[1:])
    return out


def graph_of(checkpoint: str, n: int, seed: int, folder: Path) -> Path:
    clt, _, _ = load_checkpoint(checkpoint)
    pairs = [(layer, f) for layer in range(clt.n_layers) for f in range(clt.d_features)]
    chosen = random.Random(seed).sample(pairs, min(4 * n, len(pairs)))  # dead ones dropped after the pass
    nodes = [{"node_id": f"{la}_{f}_1", "layer": str(la), "feature_type": "cross layer transcoder"} for la, f in chosen]
    path = folder / "graph.json"
    path.write_text(json.dumps({"nodes": nodes}))
    return path


def run(overrides: list[str], out: Path) -> None:
    AutoInterp(OmegaConf.to_object(compose_stage("autointerp", [*overrides, f"out={out}"]))).run()


def main() -> None:
    a = args()
    n, work = int(a["features"]), Path(tempfile.mkdtemp(prefix="autointerp_quality_"))
    base = [
        f"checkpoint={a['checkpoint']}",
        f"tokens={a['tokens']}",
        f"threads={a['threads']}",
        f"scorer={a['scorer']}",
        *(f"{k}={v}" for k, v in a.items() if k not in OWN),  # any other KEY=VALUE: an autointerp override
    ]
    start = time.perf_counter()
    if a["database"]:
        (work / "pass").mkdir()
        shutil.copy(a["database"], work / "pass" / "features.db")
        n = sys.maxsize
    else:
        base.append(f"features_from={graph_of(a['checkpoint'], n, int(a['seed']), work)}")
        run([*base, "explainer=none"], work / "pass")
    pass_s = time.perf_counter() - start
    if a["save_pass"]:  # the pass's database, to explain and score the same features again (database=)
        Path(a["save_pass"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / "pass" / "features.db", a["save_pass"])
    with closing(FeatureStore(work / "pass" / "features.db", create=False)) as store:
        live = [k for k in store.features() if store.feature(*k)["status"] != "dead"][:n]  # type: ignore[index]
    results: dict[str, object] = {"checkpoint": a["checkpoint"], "tokens": int(a["tokens"]), "features": len(live)}
    results |= {"scorer": a["scorer"], "database": a["database"] or None}
    results["pass_seconds"] = round(pass_s, 1)
    for kind in a["explainers"].split(","):
        folder = work / kind
        shutil.copytree(work / "pass", folder)
        (folder / "summary.json").unlink(missing_ok=True)
        with closing(FeatureStore(folder / "features.db", create=False)) as store:
            keep = ",".join(f"({la},{f})" for la, f in live)
            with store.db:  # only the chosen live features are explained and scored
                for table in ("features", "examples"):
                    store.db.execute(f"DELETE FROM {table} WHERE (layer, feature) NOT IN (VALUES {keep})")
            for status in ("done", "explained", "scored"):
                store.set_status("collected", status)
            store.set_meta(finished=False)
        extra = [f"explainer={kind}"]
        server = None
        if kind == "openai":
            sys.path.insert(0, str(REPO / "tests"))
            from openai_server import FakeOpenAIServer

            server = FakeOpenAIServer(logprobs=True).__enter__()
            extra += ["explainer.model=fake", f"explainer.base_url={server.base_url}"]
        start = time.perf_counter()
        try:
            run([*base, *extra], folder)
        finally:
            if server is not None:
                server.__exit__(None, None, None)
        seconds = time.perf_counter() - start
        summary = json.loads((folder / "summary.json").read_text())
        scorer = summary["scorer"]
        with closing(FeatureStore(folder / "features.db", create=False)) as store:
            labels = {f"{la}/{f}": store.feature(la, f)["explanation"] for la, f in live[:5]}  # type: ignore[index]
            absent = naming_absent_tokens(store, live)
        results[kind] = {
            "mean_score": scorer.get("mean_score"),
            "mean_control": scorer.get("mean_control"),
            "share_beats_control_by_0.2": scorer.get("share_beats_control_by_0.2"),
            "informative": scorer.get("informative"),
            "scored": scorer.get("pairs"),
            "seconds_per_feature": round(seconds / max(len(live), 1), 2),
            "labels_naming_absent_tokens": len(absent),
            "example_labels": labels,
        }
    print(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
