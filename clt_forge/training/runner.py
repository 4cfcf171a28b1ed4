"""`CLTTrainingRunner(cfg).run()`: train a CLT on an activation dataset (or on the fly).

The loop reads top to bottom: batch -> normalise -> forward -> loss -> backward -> clip ->
Adam -> schedules; held-out evaluation, checkpoints and L0-target saves around it. Everything
that decides a step's result (weights, Adam state, step, data position, RNG) is in the
resumable checkpoint, so `resume=<run dir>` continues the same loss curve.

Under torchrun the same loop runs on every rank; `sharding=` (clt_forge/distributed/parallel.py)
decides what a rank holds and reads and how its terms are reduced. Rank 0 alone writes logs,
plots and the run config; every rank takes part in evaluation and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from clt_forge.artifacts.activations import HELD_OUT, read_manifest
from clt_forge.artifacts.checkpoint import (
    STATE_STEM,
    TRAINING_STATE,
    WEIGHTS_STEM,
    CheckpointInfo,
    load_checkpoint,
    read_info,
    read_tensors,
)
from clt_forge.artifacts.normalization import Normalization
from clt_forge.artifacts.reader import ActivationBatch, check_compatible
from clt_forge.clt import CrossLayerTranscoder, init_clt, init_encoder_bias
from clt_forge.config.plain import plain
from clt_forge.config.schema import DataSource, Precision, TrainConfig
from clt_forge.data.store import ActivationsStore
from clt_forge.distributed.parallel import Parallel, start_parallel
from clt_forge.errors import CLTError
from clt_forge.models.activations import hook_names
from clt_forge.runs import setup
from clt_forge.training.metrics import DeadFeatures, MetricsLog, evaluate
from clt_forge.training.schedules import l0_coefficient, lr_multiplier

RUN_CONFIG = "train_config.json"


@dataclasses.dataclass
class StepResult:
    loss: float
    mse: float
    sparsity: float
    dead: float
    grad_norm: float
    l0_mean: float


def read_run_config(run: Path) -> dict[str, Any]:
    """The resolved config a `clt train` run recorded (what resume= continues with)."""
    path = run / RUN_CONFIG
    if not path.is_file():
        raise CLTError(f"resume={run}: no {RUN_CONFIG} there; is it a `clt train` run folder?")
    return json.loads(path.read_text())


class CLTTrainingRunner:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.d_features = cfg.clt.d_features or round(cfg.clt.expansion_factor * cfg.model.d_model)
        self.parallel: Parallel
        self.adam_step = 0.0

    # -- set-up -----------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg
        if cfg.plot:
            from clt_forge.training.plots import draw_plots
            from clt_forge.training.sweep import is_sweep, plot_sweep

            folder = Path(cfg.plot)
            for path in plot_sweep(folder) if is_sweep(folder) else draw_plots(folder):
                print(f"wrote {path}")
            return folder
        self.parallel = start_parallel(cfg)
        try:
            return self._run()
        finally:
            self.close()

    def close(self) -> None:
        """Free the wrapped module, then leave the process group. In this order: a DDP reducer
        freed after the group can deadlock gloo's teardown (its thread waits for the GIL)."""
        for name in ("module", "optimizer"):
            self.__dict__.pop(name, None)
        gc.collect()
        self.parallel.close()

    def _run(self) -> Path:
        cfg, parallel = self.cfg, self.parallel
        out = Path(cfg.resume) if cfg.resume else setup(cfg)
        out = parallel.broadcast_object(out)  # rank 0's folder: each process has its own Hydra run dir
        if cfg.resume:
            setup(dataclasses.replace(cfg, out=str(out)))
            self._check_resume(out)
        if parallel.main:
            (out / RUN_CONFIG).write_text(json.dumps(plain(cfg), indent=1))
        self.out = out
        self.total_steps = max(1, cfg.tokens // cfg.batch_size)
        store, (x_eval, y_eval, eval_source) = self._data()
        self.store = store
        self.normalization = self._normalization(store)
        self.build_model()
        self.log = MetricsLog(out / "metrics.jsonl", cfg.logger, plain(cfg)) if parallel.main else NullLog()
        self.l0_saved: list[float] = []
        start_step, moments = self._restore(store) if cfg.resume else (0, {})
        if start_step == 0:
            self.log.truncate_after(-1)
        batches: Iterator[ActivationBatch] = iter(store)
        first = next(batches)
        if start_step == 0 and not cfg.finetune.source:
            self.init_encoder_bias(self.normalization.inputs(first.mlp_in.to(parallel.device)))
        self.prepare(moments)
        try:
            self._train(itertools.chain([first], batches), start_step, x_eval, y_eval, eval_source)
        finally:
            self.log.close()
        if parallel.main:
            from clt_forge.training.plots import draw_plots

            draw_plots(out)
            print(f"CLT checkpoint: {out / 'checkpoints' / 'final'}")
        return out

    def build_model(self) -> None:
        """This rank's CLT (seeded init) and dead-feature counters; `prepare` wraps it afterwards."""
        self.features = self.parallel.features(self.d_features)
        self.clt = self._model()
        self.dead = DeadFeatures(
            self.cfg.model.n_layers, self.features.stop - self.features.start, self.cfg.dead_window_tokens
        )

    def init_encoder_bias(self, x: torch.Tensor) -> None:
        """Step 0: b_enc from the first global batch (seeded, so every rank gets its slice of one init)."""
        generator = torch.Generator().manual_seed(self.cfg.seed)
        x = self.parallel.global_batch(x)
        init_encoder_bias(
            self.clt, x, self.cfg.clt.init_l0, generator, features=self.features, d_features=self.d_features
        )

    def prepare(self, moments: dict[str, torch.Tensor] | None = None) -> None:
        """Wrap the CLT for its sharding mode and make the optimizer (with resumed Adam moments)."""
        cfg = self.cfg
        self.module = self.parallel.wrap(self.clt)
        self.optimizer = torch.optim.Adam(
            [p for p in self.clt.parameters() if p.requires_grad],
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            fused=True,  # one kernel over all parameters: ~5x faster than foreach on CPU (benchmarks/train_step.py)
        )
        if moments:
            self._load_moments(moments)

    def _check_resume(self, out: Path) -> None:
        before = read_run_config(out)
        now = plain(self.cfg)
        keys = [("clt", k) for k in now["clt"]] + [("model", "name"), ("model", "d_model"), ("model", "n_layers")]
        diffs = [f"{a}.{b}: {before[a][b]!r} -> {now[a][b]!r}" for a, b in keys if before[a][b] != now[a][b]]
        if diffs:
            raise CLTError(
                f"resume={out}: the architecture changed ({'; '.join(diffs)}); resume with the original settings."
            )

    def _data(self) -> tuple[ActivationsStore, tuple[torch.Tensor, torch.Tensor, str]]:
        """The training batches and a fixed held-out evaluation set (x, y, where it came from)."""
        cfg, parallel = self.cfg, self.parallel
        if parallel.world > 1 and (cfg.data.source is DataSource.model or not cfg.activations):
            raise CLTError(
                f"sharding={parallel.mode.value} on {parallel.world} ranks trains from a cached dataset: "
                "pass activations=PATH (write one with `clt cache`)."
            )
        if cfg.data.source is DataSource.model or not cfg.activations:
            if not cfg.activations:
                print("note: no activations=PATH given; running the model on the fly (data.source=model).")
            from clt_forge.models import load_model

            model = load_model(cfg.model)
            text = dataclasses.replace(cfg.data, source=DataSource.files if cfg.data.path else DataSource.bundled)
            store = ActivationsStore.from_model(
                model, text, cfg.batch_size, seed=cfg.seed, windows_per_forward=cfg.windows_per_forward
            )
            held = ActivationsStore.from_model(
                model,
                text,
                cfg.eval_tokens,
                split="held_out",
                seed=cfg.seed,
                windows_per_forward=cfg.windows_per_forward,
            )
            batch = next(iter(held))
            return store, (batch.mlp_in, batch.mlp_out, "held-out documents (on the fly)")
        folder = Path(cfg.activations)
        manifest = read_manifest(folder)
        check_compatible(manifest, folder, model=cfg.model.name, n_layers=cfg.model.n_layers, d_model=cfg.model.d_model)
        store = ActivationsStore.from_cache(
            folder,
            parallel.local_batch_size(cfg.batch_size),
            seed=cfg.seed,
            rank=parallel.data_rank,
            world_size=parallel.data_world,
            shuffle_chunks=cfg.reader.shuffle_chunks,
            prefetch_groups=cfg.reader.prefetch_groups,
            workers=cfg.reader.workers,
            skip_corrupt=cfg.reader.skip_corrupt,
        )
        if (folder / HELD_OUT / "manifest.json").is_file():
            held_manifest = read_manifest(folder / HELD_OUT)
            n = min(cfg.eval_tokens, held_manifest.n_tokens)
            batch = next(iter(ActivationsStore.from_cache(folder / HELD_OUT, n, seed=cfg.seed)))
            return store, (batch.mlp_in, batch.mlp_out, str(folder / HELD_OUT))
        print(f"note: {folder} has no held_out/ dataset; evaluating on a fixed batch of training tokens.")
        batch = next(iter(ActivationsStore.from_cache(folder, cfg.eval_tokens, seed=cfg.seed + 1)))
        return store, (batch.mlp_in, batch.mlp_out, "training tokens (no held-out dataset)")

    def _normalization(self, store: ActivationsStore) -> Normalization:
        if store.reader is not None and store.reader.manifest.stats:
            return Normalization.from_manifest(store.reader.manifest)
        if self.parallel.world > 1:
            raise CLTError(f"{self.cfg.activations}: its manifest has no normalisation statistics (needed on >1 rank).")
        batches = iter(store)
        return Normalization.estimate(next(batches) for _ in range(self.cfg.norm_batches))

    def _model(self) -> CrossLayerTranscoder:
        """This rank's CLT (all features, or its slice under feature sharding), seeded init."""
        cfg, device = self.cfg, self.parallel.device
        if cfg.finetune.source:
            from clt_forge.training.lora import add_lora

            if self.parallel.world > 1:
                raise CLTError("finetune.from runs in one process (sharding=single); LoRA adapters are small.")
            clt, self.normalization, _ = load_checkpoint(cfg.finetune.source, device=device)
            add_lora(clt, cfg.finetune.rank)
            return clt
        clt = CrossLayerTranscoder(
            cfg.model.n_layers,
            cfg.model.d_model,
            self.features.stop - self.features.start,
            bandwidth=cfg.clt.jumprelu_bandwidth,
            device=device,
            init=False,
        )
        init_clt(clt, cfg.clt.jumprelu_threshold, seed=cfg.seed, features=self.features, d_features=self.d_features)
        return clt

    # -- the loop ---------------------------------------------------------------------------
    def _train(
        self,
        batches: Iterator[ActivationBatch],
        start_step: int,
        x_eval: torch.Tensor,
        y_eval: torch.Tensor,
        eval_source: str,
    ) -> None:
        cfg, device = self.cfg, self.parallel.device
        x_eval = self.normalization.inputs(x_eval.to(device))
        y_eval = self.normalization.outputs(y_eval.to(device))
        bar = tqdm(
            total=self.total_steps,
            initial=start_step,
            unit="step",
            desc="clt train",
            disable=None if self.parallel.main else True,
        )
        started, tokens_at_start = time.perf_counter(), start_step * cfg.batch_size
        step = start_step
        for step in range(start_step, self.total_steps):
            batch = next(batches)
            x = self.normalization.inputs(batch.mlp_in.to(device, non_blocking=True))
            y = self.normalization.outputs(batch.mlp_out.to(device, non_blocking=True))
            result = self.train_step(step, x, y)
            tokens = (step + 1) * cfg.batch_size
            if step % cfg.log_every == 0 or step == self.total_steps - 1:
                speed = (tokens - tokens_at_start) / (time.perf_counter() - started)
                self.log.write(
                    {
                        "kind": "train",
                        "step": step,
                        "tokens": tokens,
                        **dataclasses.asdict(result),
                        "l0_coefficient": l0_coefficient(step, self.total_steps, cfg.sparsity),
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "tokens_per_s": speed,
                    }
                )
                bar.set_postfix(loss=f"{result.loss:.3g}", l0=f"{result.l0_mean:.1f}", tok_s=f"{speed:.0f}")
            last = step == self.total_steps - 1
            if step % cfg.eval_every == 0 or last:
                metrics = self._evaluate(step, tokens, x_eval, y_eval, eval_source)
                bar.set_postfix(
                    loss=f"{result.loss:.3g}", l0=f"{metrics['l0_mean']:.1f}", ev=f"{metrics['ev_mean']:.3f}"
                )
                if self._l0_targets(step, metrics["l0_mean"]):
                    break
            if (step + 1) % cfg.checkpoint_every == 0 and not last:
                self._save_resumable(step + 1)
            bar.update(1)
        bar.close()
        self._save("final", self.total_steps if not cfg.optimal_l0 else step + 1, training_state=True)

    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """One optimizer step on this rank's share (x, y) of the global batch (normalised units)."""
        cfg, parallel = self.cfg, self.parallel
        lambda0 = l0_coefficient(step, self.total_steps, cfg.sparsity)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.optim.lr * lr_multiplier(step, self.total_steps, cfg.optim)
        with self._autocast():
            output = self.module(x)
            terms, logged = parallel.loss(
                self.clt, output, y, lambda0, c=cfg.sparsity.c, dead=cfg.sparsity.dead_coefficient
            )
        for name in ("mse", "sparsity", "dead", "total"):
            value = getattr(logged, name)
            if not torch.isfinite(value):
                raise CLTError(f"step {step}: the {name} loss term is {value.item()}; stopped. {self._last_good()}")
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        grad_norm = parallel.clip_grad_norm(self.clt, cfg.optim.grad_clip)
        if not torch.isfinite(grad_norm):
            raise CLTError(
                f"step {step}: the gradient norm is {grad_norm.item()}; stopped before the update. {self._last_good()}"
            )
        self.optimizer.step()
        self.dead.update_fired(*parallel.fired(output.features))
        return StepResult(
            loss=logged.total.item(),
            mse=logged.mse.item(),
            sparsity=logged.sparsity.item(),
            dead=logged.dead.item(),
            grad_norm=grad_norm.item(),
            l0_mean=parallel.l0_mean(output.features),
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.precision is Precision.fp32:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision is Precision.bf16 else torch.float16
        return torch.autocast(device_type=self.parallel.device.type, dtype=dtype)

    def _evaluate(self, step: int, tokens: int, x: torch.Tensor, y: torch.Tensor, source: str) -> dict[str, Any]:
        module = self.parallel.eval_module(self.module)
        metrics = evaluate(module, x, y, reduce_l0=self.parallel.sum_features)
        self.parallel.after_eval(self.module)
        dead = self.parallel.sum_features(torch.tensor(self.dead.per_layer())).tolist()
        record = {
            "kind": "eval",
            "step": step,
            "tokens": tokens,
            **metrics,
            "dead_features": dead,
            "dead_total": sum(dead),
            "eval_source": source,
        }
        self.log.write(record)
        return record

    def _l0_targets(self, step: int, l0_mean: float) -> bool:
        """Save at each checkpoint_l0 target when first reached; True when optimal_l0 is reached."""
        for target in sorted(self.cfg.checkpoint_l0, reverse=True):
            if l0_mean <= target and target not in self.l0_saved:
                self.l0_saved.append(target)
                self._save(f"l0-{target:g}", step + 1, training_state=False)
        return self.cfg.optimal_l0 is not None and l0_mean <= self.cfg.optimal_l0

    # -- checkpoints ------------------------------------------------------------------------
    def _info(self, step: int) -> CheckpointInfo:
        cfg = self.cfg
        return CheckpointInfo(
            n_layers=cfg.model.n_layers,
            d_model=cfg.model.d_model,
            d_features=self.d_features,
            bandwidth=cfg.clt.jumprelu_bandwidth,
            model=plain(cfg.model),
            hooks=hook_names(cfg.model.n_layers),
            step=step,
            tokens=step * cfg.batch_size,
            train=plain(cfg),
        )

    def _save(self, name: str, step: int, training_state: bool) -> Path:
        """Collective: every rank calls it (gathers, shards); see Parallel.save."""
        from clt_forge.training.lora import merged_copy

        weights = self.parallel.full_tensors(dict(merged_copy(self.clt).state_dict()))
        state, tensors = self._training_state(step) if training_state else (None, None)
        folder = self.out / "checkpoints" / name
        self.parallel.save(folder, weights, self.normalization, self._info(step), state, tensors)
        return folder

    def _save_resumable(self, step: int) -> None:
        self._save(f"step-{step:08d}", step, training_state=True)
        if self.parallel.main:
            resumable = sorted((self.out / "checkpoints").glob("step-*"))
            for old in resumable[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old)
        self.parallel.barrier()

    def _training_state(self, step: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(scalars and small things, this rank's tensors: Adam moments by parameter name, dead counters)."""
        moments: dict[str, torch.Tensor] = {}
        adam_step = 0.0
        for name, param in self.clt.named_parameters():
            found = self.optimizer.state.get(param)
            if found:
                moments[f"exp_avg.{name}"], moments[f"exp_avg_sq.{name}"] = found["exp_avg"], found["exp_avg_sq"]
                adam_step = float(found["step"])
        tensors = self.parallel.full_tensors(moments)
        tensors["dead.last_fired"] = self.dead.last_fired
        state = {
            "step": step,
            "adam_step": adam_step,
            "readers": self.parallel.gather_ints(self.store.tokens_served),  # tokens served, per data rank
            "data_world": self.parallel.data_world,
            "dead_tokens": self.dead.tokens,
            "l0_saved": list(self.l0_saved),
            "rng": torch.get_rng_state(),
        }
        if self.cfg.finetune.source:  # LoRA: the checkpoint holds merged weights; keep the adapters
            state["trainable"] = {n: p.detach().clone() for n, p in self.clt.named_parameters() if p.requires_grad}
        return state, tensors

    def _last_good(self) -> str:
        found = latest_checkpoint(self.out)
        return f"The last good checkpoint is {found}." if found else "No checkpoint was written yet."

    def _restore(self, store: ActivationsStore) -> tuple[int, dict[str, torch.Tensor]]:
        """Load this rank's slice of the newest resumable checkpoint, written at any world size and
        in any sharding mode; returns (step, the Adam moments to load once the optimizer exists)."""
        found = latest_checkpoint(self.out)
        if found is None:
            raise CLTError(f"resume={self.out}: no resumable checkpoint under {self.out / 'checkpoints'}.")
        if store.reader is None:
            raise CLTError("resume needs a cached dataset (activations=PATH): on-the-fly batches cannot be replayed.")
        info = read_info(found)
        state = torch.load(found / TRAINING_STATE, weights_only=False)
        if "readers" not in state:
            raise CLTError(f"{found}: written by an older clt-forge (training state without 'readers'); cannot resume.")
        device = self.parallel.device
        with torch.no_grad():
            params = dict(self.clt.named_parameters())
            if self.cfg.finetune.source:
                for name, value in state["trainable"].items():
                    params[name].copy_(value)
            else:
                weights = read_tensors(found, WEIGHTS_STEM, info, self.features, device=device)
                self.clt.load_state_dict({k: v for k, v in weights.items() if not k.startswith("norm.")})
        tensors = read_tensors(found, STATE_STEM, info, self.features, device=device)
        self.dead.load({"tokens": state["dead_tokens"], "last_fired": tensors.pop("dead.last_fired").cpu()})
        self.l0_saved = state["l0_saved"]
        torch.set_rng_state(state["rng"])
        self.adam_step = state["adam_step"]
        readers, world = state["readers"], self.parallel.data_world
        if state["data_world"] == world:
            position = readers[self.parallel.data_rank]
        else:
            position = sum(readers[: state["data_world"]]) // world
            if self.parallel.main:
                print(
                    f"note: {found} was written with {state['data_world']} data-parallel ranks, this run has {world}: "
                    "the weights and optimizer continue exactly, the data order starts afresh at the same token count."
                )
        store.reader.start_tokens = store.reader.tokens_served = position
        self.log.truncate_after(state["step"] - 1)
        if self.parallel.main:
            print(f"resumed from {found} at step {state['step']}")
        return int(state["step"]), tensors

    def _load_moments(self, moments: dict[str, torch.Tensor]) -> None:
        """Adam state from checkpoint tensors (this rank's features); FSDP takes its own shard."""
        for name, param in self.clt.named_parameters():
            if f"exp_avg.{name}" not in moments:
                continue
            pair = [moments[f"{kind}.{name}"].to(self.parallel.device) for kind in ("exp_avg", "exp_avg_sq")]
            if hasattr(param, "device_mesh"):  # an FSDP2 DTensor parameter
                from torch.distributed.tensor import distribute_tensor

                pair = [distribute_tensor(t, param.device_mesh, param.placements) for t in pair]  # type: ignore[attr-defined]
            step = torch.tensor(self.adam_step, dtype=torch.float32, device=self.parallel.device)
            self.optimizer.state[param] = {"step": step, "exp_avg": pair[0], "exp_avg_sq": pair[1]}


class NullLog:
    """The metrics log of ranks other than 0: they compute the same numbers and write nothing."""

    def truncate_after(self, step: int) -> None:
        pass

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete resumable checkpoint of a run (step-* or final)."""
    candidates = [p for p in (run / "checkpoints").glob("step-*") if (p / TRAINING_STATE).is_file()]
    return max(candidates, key=lambda p: read_info(p).step, default=None)
