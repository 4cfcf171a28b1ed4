"""`AutoInterp`: a CLT checkpoint + text -> a feature database of evidence, explanations, scores.

    AutoInterp(cfg).run()        # cfg: AutointerpConfig (what `clt autointerp` composes)

Steps (each resumable; see clt_forge/artifacts/features.py):
1. the streaming pass over `tokens` tokens for this worker's features (collect.py), written to
   the worker's database in one transaction;
2. explanations for every feature that fired (explainers.py, prompts.py, tokens.py; the candidate
   chosen in labels.py);
3. detection scores with a control on held-out contexts (scoring.py);
4. when every worker's database is complete, the merged `features.db`, circuit-tracer feature
   JSON files (`export=`) and summary.json.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm

from clt_forge.artifacts.checkpoint import load_features, read_info
from clt_forge.artifacts.feature_json import export_feature_files
from clt_forge.artifacts.feature_subset import FeatureSubset
from clt_forge.artifacts.features import FeatureStore, merge_stores
from clt_forge.artifacts.graph import NodeKind, parse_node
from clt_forge.autointerp.collect import HIST_EDGES, Collector, Contexts, FeatureSlice
from clt_forge.autointerp.explainers import NO_EXPLAINER, Explainer, make_explainer, validate_kinds
from clt_forge.autointerp.labels import SELECT_SILENT
from clt_forge.autointerp.scoring import check_scorer, explainer_evidence
from clt_forge.autointerp.source import check_sources, dataset_windows, grouped, model_windows
from clt_forge.config.schema import AutointerpConfig
from clt_forge.errors import CLTError
from clt_forge.models.loading import checkpoint_model_config, load_model

__all__ = ["AutoInterp", "select_features", "worker_db_name"]

MERGED = "features.db"


def worker_db_name(index: int, count: int) -> str:
    return MERGED if count == 1 else f"features.worker-{index:03d}-of-{count:03d}.db"


def select_features(n_layers: int, d_features: int, graph: str | None, index: int, count: int) -> list[tuple[int, int]]:
    """This worker's (layer, feature) pairs: all features, or those in a graph JSON, every
    `count`-th one starting at `index` (so each layer's features spread over the workers)."""
    if not 0 <= index < count:
        raise CLTError(f"worker.index={index} must be in 0..worker.count-1 (worker.count={count}).")
    if graph is None:
        chosen = [(layer, feature) for layer in range(n_layers) for feature in range(d_features)]
    else:
        path = Path(graph)
        try:
            nodes = json.loads(path.read_text())["nodes"]
            ids = [parse_node(n) for n in nodes if n.get("feature_type") == NodeKind.FEATURE]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CLTError(f"features_from={path}: not a graph JSON from `clt attribute` ({err}).") from None
        chosen = sorted({(cast(int, n.layer), cast(int, n.index)) for n in ids})
        bad = [(layer, f) for layer, f in chosen if layer >= n_layers or f >= d_features]
        if bad:
            raise CLTError(f"features_from={path}: features {bad[:3]} do not exist in this CLT.")
    return chosen[index::count]


class AutoInterp:
    def __init__(self, cfg: AutointerpConfig) -> None:
        self.cfg = cfg

    def run(self, checkpoint: str | Path | None = None, out: str | Path | None = None) -> Path:
        """Run this worker's steps; returns the merged database when complete, else the worker's."""
        from clt_forge.runs import output_dir

        cfg = self.cfg
        if cfg.explain:
            validate_kinds(cfg.explainer)  # a typo fails now, not after the pass
        check_scorer(cfg.scorer)
        out = Path(out) if out is not None else output_dir(cfg)
        if cfg.merge:
            return self._finish(Path(cfg.merge))
        checkpoint = checkpoint or cfg.checkpoint
        if not checkpoint:
            raise CLTError("clt autointerp needs checkpoint=PATH (a CLT checkpoint folder written by `clt train`).")
        info = read_info(checkpoint)
        model_cfg = checkpoint_model_config(info.model, cfg.model, checkpoint)  # imported CLTs: model=
        hooks = check_sources(cfg.activations, info, checkpoint, model_cfg)  # before loading anything heavy
        model = load_model(model_cfg)
        index, count = cfg.worker.index, cfg.worker.count
        db_path = out / worker_db_name(index, count)
        out.mkdir(parents=True, exist_ok=True)
        with closing(FeatureStore(db_path)) as store:
            if not store.meta().get("pass_done"):
                chosen = select_features(info.n_layers, info.d_features, cfg.features_from, index, count)
                self._pass(store, model, model_cfg, chosen, str(checkpoint), hooks)
            if cfg.dry_run:
                self._dry_run(store)
                return db_path
            self._explain_and_score(store)
            store.set_meta(finished=True)
        if count == 1:
            return self._finish(out)
        expected = [out / worker_db_name(i, count) for i in range(count)]
        if all(_complete(path) for path in expected):
            return self._finish(out)
        print(f"worker {index} of {count} done: {db_path}; the last worker to finish merges into {out / MERGED}.")
        return db_path

    # ---- 1. the streaming pass -------------------------------------------------------------

    def _pass(
        self,
        store: FeatureStore,
        model: Any,
        model_cfg: Any,
        chosen: list[tuple[int, int]],
        checkpoint: str,
        hooks: tuple[str, str],
    ) -> None:
        cfg = self.cfg
        if not chosen:
            raise CLTError("this worker has no features (more workers than features?).")
        subset = load_features(checkpoint, chosen)  # their encoders and decoder rows, not the CLT
        features = _slice(subset)
        sample = cfg.quantiles * cfg.per_quantile + cfg.score_examples
        collector = Collector(
            features,
            top_k=cfg.top_k,
            sample=sample,
            silent=max(cfg.non_activating, cfg.score_examples // 2 + SELECT_SILENT),
            before=cfg.context_before,
            after=cfg.context_after,
            seed=cfg.seed,
            silent_every=cfg.silent_every,
        )
        if cfg.activations:
            _, batches = dataset_windows(cfg.activations, model_cfg)
            source = str(cfg.activations)
        else:
            _, batches = model_windows(model, cfg.data, hooks=hooks)  # at the CLT's declared hooks
            source = f"model {model_cfg.name} on the fly ({cfg.data.name})"
        start = time.perf_counter()
        with tqdm(total=cfg.tokens, desc="autointerp pass", unit="tok", unit_scale=True) as bar:
            for tokens, mlp_in in grouped(batches, cfg.batch_size):
                windows = -(-(cfg.tokens - collector.tokens_seen) // tokens.shape[1])  # whole windows still needed
                tokens, mlp_in = tokens[:windows], mlp_in[:windows]
                collector.update(tokens, mlp_in.float())
                bar.update(tokens.numel())
                if collector.tokens_seen >= cfg.tokens:
                    break
        if collector.tokens_seen < cfg.tokens:
            print(f"note: {source} holds {collector.tokens_seen} tokens, fewer than tokens={cfg.tokens}.")
        seconds = time.perf_counter() - start
        rows, examples = self._rows(collector, model, subset)
        store.write_pass(
            rows,
            examples,
            checkpoint=str(Path(checkpoint).resolve()),
            source=source,
            tokens=collector.tokens_seen,
            worker={"index": cfg.worker.index, "count": cfg.worker.count},
            hist_edges=HIST_EDGES.tolist(),
            context={"before": cfg.context_before, "after": cfg.context_after},
            display={"histogram_bins": cfg.histogram_bins, "quantiles": cfg.quantiles},
            model=model_cfg.name,
            pass_seconds=seconds,
        )

    def _rows(
        self, collector: Collector, model: Any, subset: FeatureSubset
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        cfg = self.cfg
        feats = collector.features
        decode = _Decoder(model.tokenizer)
        top_ids, bottom_ids = _logit_tokens(subset, model, cfg.top_logits)  # in the collector's order
        rows, examples = [], []
        seen = max(collector.tokens_seen, 1)
        for i, (layer, feature) in enumerate(zip(feats.layers, feats.features, strict=True)):
            count = int(collector.count[i])
            kept = []
            for kind, state in (("top", collector.top), ("sample", collector.sample), ("silent", collector.silent)):
                for rank, example in enumerate(_examples(state, i, decode, cfg.context_before)):
                    examples.append({"layer": layer, "feature": feature, "kind": kind, "rank": rank, **example})
                    if kind != "silent":
                        kept.append(example["token_ids"][example["center"]])
            rows.append(
                {
                    "layer": layer,
                    "feature": feature,
                    "n_active": count,
                    "frequency": count / seen,
                    "mean_act": float(collector.total[i]) / count if count else 0.0,
                    "max_act": float(collector.max[i]),
                    "histogram": collector.histogram[i].tolist(),
                    "top_tokens": [[decode(t), c] for t, c in Counter(kept).most_common(10)],
                    "top_logits": [decode(t) for t in top_ids[i]],
                    "bottom_logits": [decode(t) for t in bottom_ids[i]],
                    "status": "collected" if count else "dead",
                }
            )
        return rows, examples

    # ---- 2 + 3. explanations and scores ----------------------------------------------------

    def _explain_and_score(self, store: FeatureStore) -> None:
        cfg = self.cfg
        pending = store.with_status("collected")
        if not cfg.explain or cfg.explainer.kind == NO_EXPLAINER:
            store.set_status("done", "collected")
            return
        to_score = store.with_status("explained") if cfg.score else []
        if not pending and not to_score:
            return
        from clt_forge.autointerp.labels import choose_labels
        from clt_forge.autointerp.scoring import score_store

        explainer = make_explainer(cfg.explainer)
        assert explainer is not None
        judge = _judge(cfg, explainer)
        half = cfg.score_examples // 2
        rejected = fallbacks = 0
        try:
            batch = 8
            for start in tqdm(range(0, len(pending), batch), desc="explaining", unit="batch"):
                group = pending[start : start + batch]
                evidence = [explainer_evidence(store.evidence(layer, feature), half) for layer, feature in group]
                silent = [e.non_activating for e in evidence]  # not the scorer's contexts
                choices = choose_labels(explainer, judge, evidence, cfg.explainer.candidates, silent, cfg.scorer)
                for (layer, feature), choice in zip(group, choices, strict=True):
                    store.set_explanation(layer, feature, choice.label)
                    rejected += len(choice.rejected)
                    fallbacks += choice.fallback
            if pending and cfg.explainer.kind != "tokens":
                print(
                    f"explanations: {rejected} answers rejected; the tokens label replaced {fallbacks} of {len(pending)}."
                )
            if cfg.score:
                score_store(store, judge, half, cfg.seed, cfg.scorer)
                used = getattr(judge, "judge_model", judge)  # the tokens kind's own judge
                protocol = getattr(used, "protocol", None)
                store.set_meta(scorer="auroc", scored_on=cfg.scorer, judge=_judge_kind(cfg), judge_protocol=protocol)
        finally:
            if judge is not explainer:
                judge.close()
            explainer.close()

    def _dry_run(self, store: FeatureStore) -> None:
        from clt_forge.autointerp.prompts import explanation_messages, render_prompt

        for layer, feature in store.with_status("collected") + store.with_status("explained"):
            print(render_prompt(explanation_messages(store.evidence(layer, feature))))
            return
        print("no feature fired in this worker's pass: nothing to explain.")

    # ---- 4. merge, export, summary ---------------------------------------------------------

    def _finish(self, folder: Path) -> Path:
        from clt_forge.autointerp.labels import naming_absent_tokens
        from clt_forge.autointerp.scoring import summarize, verdict

        count = self.cfg.worker.count
        merged = folder / MERGED
        if count > 1 or self.cfg.merge:
            parts = sorted(folder.glob("features.worker-*.db"))
            merged = merge_stores(parts, merged)
        with closing(FeatureStore(merged, create=False)) as store:
            summary = {
                "database": str(merged),
                "features": sum(1 for _ in store.features()),
                "explained": len(store.explanations()),
                "detection_scores": summarize(store.scores()),
                "control_scores": summarize(store.controls()),
                "labels_naming_absent_tokens": len(naming_absent_tokens(store)),
            }
            meta = store.meta()
            scorer = {
                "kind": meta.get("scorer", "auroc"),
                "scored_on": meta.get("scored_on", "context"),  # databases before the token scorer: context
                "judge": meta.get("judge"),
                "protocol": meta.get("judge_protocol"),
            }
            scorer |= verdict(store.scores(), store.controls())
            summary["scorer"] = scorer
            if scorer.get("message") and scorer["pairs"]:
                print("!" * 80 + "\n" + str(scorer["message"]) + "\n" + "!" * 80)
            if self.cfg.export:
                summary["exported"] = export_feature_files(store, Path(self.cfg.export))
        (folder / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"feature database: {merged} ({summary['features']} features, {summary['explained']} explained)")
        return merged


def _judge_kind(cfg: AutointerpConfig) -> str:
    """The explainer kind that judged the detection questions (recorded in the summary)."""
    from clt_forge.autointerp.tokens import DEFAULT_JUDGE

    if cfg.explainer.kind == "tokens":
        return cfg.explainer.judge or DEFAULT_JUDGE
    return cfg.explainer.judge or cfg.explainer.kind


def _judge(cfg: AutointerpConfig, explainer: Explainer) -> Explainer:
    """What answers detection questions: explainer.judge when set for an LLM kind, else the explainer
    (the tokens kind delegates to its own judge)."""
    if cfg.explainer.judge is None or cfg.explainer.kind == "tokens":
        return explainer
    judge = make_explainer(replace(cfg.explainer, kind=cfg.explainer.judge, judge=None))
    assert judge is not None
    return judge


def _complete(path: Path) -> bool:
    if not path.is_file():
        return False
    with closing(FeatureStore(path, create=False)) as store:
        return bool(store.meta().get("finished"))


def _slice(subset: FeatureSubset) -> FeatureSlice:
    """The collector's encoders: the subset's, in its (layer-major) order."""
    in_scale = subset.in_scale.float().clone()
    return FeatureSlice(
        list(subset.layers), list(subset.features), subset.W_enc, subset.b_enc, subset.threshold, in_scale
    )


def _logit_tokens(subset: FeatureSubset, model: Any, k: int) -> tuple[list[list[int]], list[list[int]]]:
    """Top / bottom tokens of each feature's decoder (summed over its target layers, raw units)
    read through the unembedding, in the subset's order."""
    W_U = model.W_U.detach().float()  # [D, V]
    top, bottom = [], []
    with torch.no_grad():
        for layer, rows in enumerate(subset.W_dec):
            if rows.shape[0] == 0:
                continue
            decoder = rows.float() * subset.out_scale[layer:, None].float()  # [n, T, D]
            logits = decoder.sum(1) @ W_U
            k_eff = min(k, logits.shape[1])
            top += logits.topk(k_eff).indices.tolist()
            bottom += (-logits).topk(k_eff).indices.tolist()
    return top, bottom


class _Decoder:
    """tokenizer.decode of single ids, cached (a feature database repeats tokens a lot)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token])
        return self.cache[token]


def _examples(state: Contexts, row: int, decode: _Decoder, before: int) -> list[dict[str, Any]]:
    out = []
    for k in state.ordered(row):
        ids = state.tokens[row, k].tolist()
        keep = [j for j, t in enumerate(ids) if t >= 0]
        out.append(
            {
                "position": int(state.positions[row, k]),
                "value": float(state.values[row, k]),
                "center": sum(1 for j in keep if j < before),
                "token_ids": [ids[j] for j in keep],
                "tokens": [decode(ids[j]) for j in keep],
                "acts": [round(float(state.acts[row, k, j]), 5) for j in keep],
            }
        )
    return out
