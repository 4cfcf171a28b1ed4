"""`CLTTrainingRunner(cfg).run()`: train a CLT on an activation dataset (or on the fly).

The loop reads top to bottom: batch -> normalise -> forward -> loss -> backward -> unscale ->
clip -> Adam -> schedules; held-out evaluation, checkpoints and L0-target saves around it.
Everything that decides a step's result (weights, Adam state, loss scale, step, data position,
RNG) is in the resumable checkpoint (clt_forge/training/resume.py), so `resume=<run dir>`
continues the same loss curve, and `resume=<run dir> tokens=<more>` trains a finished run longer.
What the run needs before its first step is built in clt_forge/training/build.py.

Under torchrun the same loop runs on every rank; `sharding=` (clt_forge/distributed/parallel.py)
decides what a rank holds and reads and how its terms are reduced. Rank 0 alone writes logs,
plots and the run config; every rank takes part in evaluation and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from clt_forge.artifacts.checkpoint import CheckpointInfo
from clt_forge.artifacts.reader import ActivationBatch
from clt_forge.clt import init_encoder_bias
from clt_forge.config.plain import plain
from clt_forge.config.schema import Precision, TrainConfig
from clt_forge.distributed.parallel import Parallel, start_parallel
from clt_forge.errors import CLTError
from clt_forge.heap import keep_freed_memory
from clt_forge.models.activations import hook_names
from clt_forge.progress import progress_bar
from clt_forge.runs import setup
from clt_forge.training.build import (
    HeldOut,
    build_clt,
    check_resume,
    decoder_grad_sink,
    normalization,
    read_run_config,
    resolve_finetune,
    training_data,
    write_run_config,
)
from clt_forge.training.metrics import DeadFeatures, MetricsLog, evaluate
from clt_forge.training.resume import (
    Resumed,
    latest_checkpoint,
    load_optimizer_state,
    restore,
    schedule_note,
    training_state,
)
from clt_forge.training.schedules import l0_coefficient, lr_multiplier

__all__ = ["CLTTrainingRunner", "latest_checkpoint", "read_run_config", "start_parallel"]


@dataclasses.dataclass
class StepResult:
    loss: float
    mse: float
    sparsity: float
    dead: float
    grad_norm: float  # of the true (unscaled) gradients, before clipping
    l0_mean: float
    grad_scale: float  # the fp16 loss scale this step used (1.0 without one)
    skipped: bool  # fp16: the gradients overflowed, so the optimizer did not step


class CLTTrainingRunner:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        resolve_finetune(cfg)  # a finetune's width and STE bandwidth are its checkpoint's
        self.d_features = cfg.clt.d_features or round(cfg.clt.expansion_factor * cfg.model.d_model)
        self.parallel: Parallel
        self.resumed: Resumed | None = None

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
            check_resume(cfg, out)
        if parallel.main:
            write_run_config(cfg, out)
        self.out = out
        self.total_steps = max(1, cfg.tokens // cfg.batch_size)
        self.store, held_out = training_data(cfg, parallel)
        self.normalization = normalization(cfg, parallel, self.store)
        self.build_model()
        self.log = MetricsLog(out / "metrics.jsonl", cfg.logger, plain(cfg)) if parallel.main else NullLog()
        self.l0_saved: list[float] = []
        start_step = self._restore() if cfg.resume else 0
        if start_step == 0:
            self.log.truncate_after(-1)
        batches: Iterator[ActivationBatch] = iter(self.store)
        first = next(batches)
        if start_step == 0 and not cfg.finetune.source:
            self.init_encoder_bias(self.normalization.inputs(first.mlp_in.to(parallel.device)))
        self.prepare()
        try:
            self._train(itertools.chain([first], batches), start_step, held_out)
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
        self.clt, pretrained_normalization = build_clt(self.cfg, self.parallel, self.features, self.d_features)
        if pretrained_normalization is not None:  # finetuning keeps the units the CLT was trained in
            self.normalization = pretrained_normalization
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

    def prepare(self) -> None:
        """Wrap the CLT for its sharding mode, make the optimizer and the fp16 loss scaler (with
        the resumed state, if any)."""
        cfg = self.cfg
        self.module = self.parallel.wrap(self.clt)
        self.optimizer = torch.optim.Adam(
            [p for p in self.clt.parameters() if p.requires_grad],
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            fused=True,  # one kernel over all parameters: ~5x faster than foreach on CPU (benchmarks/train_step.py)
        )
        self.deferred = decoder_grad_sink(cfg, self.parallel, self.clt, self.optimizer)
        self.scaler = self.parallel.grad_scaler(cfg.precision is Precision.fp16, cfg.grad_scale_init)
        if self.resumed is not None:
            exp_avg = {"W_dec": self.deferred.exp_avg_dtype} if self.deferred is not None else {}
            load_optimizer_state(self.optimizer, self.scaler, self.clt, self.resumed, self.parallel.device, exp_avg)

    # -- the loop ---------------------------------------------------------------------------
    def _train(self, batches: Iterator[ActivationBatch], start_step: int, held_out: HeldOut) -> None:
        cfg, device = self.cfg, self.parallel.device
        x_eval = self.normalization.inputs(held_out.x.to(device))
        y_eval = self.normalization.outputs(held_out.y.to(device))
        bar = progress_bar(
            total=self.total_steps * cfg.batch_size,
            initial=start_step * cfg.batch_size,
            unit="tok",
            unit_scale=True,
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
            if step == start_step and cfg.keep_freed_memory and device.type == "cpu":
                keep_freed_memory()  # Adam's state now exists; each later step reuses its pages (clt_forge/heap.py)
            tokens = (step + 1) * cfg.batch_size
            last = step == self.total_steps - 1
            if step % cfg.log_every == 0 or last or result.skipped:
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
            if step % cfg.eval_every == 0 or last:
                metrics = self._evaluate(step, tokens, x_eval, y_eval, held_out.source)
                bar.set_postfix(
                    loss=f"{result.loss:.3g}", l0=f"{metrics['l0_mean']:.1f}", ev=f"{metrics['ev_mean']:.3f}"
                )
                if self._l0_targets(step, metrics["l0_mean"]):
                    break
            if (step + 1) % cfg.checkpoint_every == 0 and not last:
                self._save_resumable(step + 1)
            bar.update(cfg.batch_size)
        bar.close()
        self._save("final", self.total_steps if not cfg.optimal_l0 else step + 1, training_state=True)

    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """One optimizer step on this rank's share (x, y) of the global batch (normalised units)."""
        cfg, parallel, scaler = self.cfg, self.parallel, self.scaler
        lambda0 = l0_coefficient(step, self.total_steps, cfg.sparsity)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.optim.lr * lr_multiplier(step, self.total_steps, cfg.optim)
        with self._autocast():
            output = self.module(x)
            terms, logged = parallel.loss(
                self.clt, output, y, lambda0, c=cfg.sparsity.c, dead=cfg.sparsity.dead_coefficient
            )
        for name in ("mse", "sparsity", "dead", "total"):  # a forward overflow: no loss scale fixes it
            value = getattr(logged, name)
            if not torch.isfinite(value):
                raise CLTError(f"step {step}: the {name} loss term is {value.item()}; stopped. {self._last_good()}")
        self.optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms.total).backward()
        scaler.unscale_(self.optimizer)  # clip (and report) the true gradients, in every sharding mode
        grad_norm = parallel.clip_grad_norm(self.clt, cfg.optim.grad_clip)
        if not torch.isfinite(grad_norm) and not scaler.is_enabled():
            raise CLTError(
                f"step {step}: the gradient norm is {grad_norm.item()}; stopped before the update. {self._last_good()}"
            )
        scale = scaler.get_scale()
        scaler.step(self.optimizer)  # fp16: skipped when any rank's gradients hold an inf/NaN
        if self.deferred is not None:  # optim.decoder_grad=blocks / rows: W_dec's own Adam step
            self.deferred.adam_step(self.optimizer, self.clt.W_dec)
        scaler.update()
        self.dead.update_fired(*parallel.fired(output.features))
        return StepResult(
            loss=logged.total.item(),
            mse=logged.mse.item(),
            sparsity=logged.sparsity.item(),
            dead=logged.dead.item(),
            grad_norm=grad_norm.item(),
            l0_mean=parallel.l0_mean(output.features),
            grad_scale=scale,
            skipped=scaler.is_enabled() and scaler.get_scale() < scale,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.precision is Precision.fp32:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision is Precision.bf16 else torch.float16
        return torch.autocast(device_type=self.parallel.device.type, dtype=dtype)

    def _decoder_up_to_date(self) -> None:
        """Every row of W_dec (and its Adam moments) up to this step (optim.decoder_grad=rows)."""
        if self.deferred is not None:
            self.deferred.flush(self.clt.W_dec)

    def _evaluate(self, step: int, tokens: int, x: torch.Tensor, y: torch.Tensor, source: str) -> dict[str, Any]:
        self._decoder_up_to_date()
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
            bandwidth=cfg.clt.jumprelu_bandwidth,  # a finetune's: its checkpoint's (resolve_finetune)
            model=plain(cfg.model),
            hooks=hook_names(cfg.model.n_layers, cfg.model.hook_in, cfg.model.hook_out),
            step=step,
            tokens=step * cfg.batch_size,
            train=plain(cfg),
        )

    def _save(self, name: str, step: int, training_state: bool) -> Path:
        """Collective: every rank calls it (gathers, shards); see Parallel.save."""
        from clt_forge.training.lora import merged_copy

        self._decoder_up_to_date()

        weights = self.parallel.full_tensors(dict(merged_copy(self.clt).state_dict()))
        state, tensors = self._training_state(step) if training_state else (None, None)
        folder = self.out / "checkpoints" / name
        self.parallel.save(folder, weights, self.normalization, self._info(step), state, tensors)
        return folder

    def _training_state(self, step: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        lora = bool(self.cfg.finetune.source)
        args = (self.clt, self.optimizer, self.scaler, self.parallel, self.store, self.dead, self.l0_saved, lora)
        return training_state(step, *args)

    def _save_resumable(self, step: int) -> None:
        self._save(f"step-{step:08d}", step, training_state=True)
        if self.parallel.main:
            resumable = sorted((self.out / "checkpoints").glob("step-*"))
            for old in resumable[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old)
        self.parallel.barrier()

    def _last_good(self) -> str:
        found = latest_checkpoint(self.out)
        return f"The last good checkpoint is {found}." if found else "No checkpoint was written yet."

    def _restore(self) -> int:
        """Continue from the newest resumable checkpoint (step-* or final); returns its step."""
        found = latest_checkpoint(self.out)
        if found is None:
            raise CLTError(f"resume={self.out}: no resumable checkpoint under {self.out / 'checkpoints'}.")
        lora = bool(self.cfg.finetune.source)
        resumed = restore(found, self.clt, self.features, self.parallel, self.store, self.dead, lora)
        if resumed.step >= self.total_steps:
            done = resumed.step * self.cfg.batch_size
            raise CLTError(
                f"resume={self.out}: {found.name} has already trained {done} tokens (step {resumed.step}) and "
                f"tokens={self.cfg.tokens} asks for no more; pass tokens=N with N > {done} to train it longer."
            )
        self.resumed, self.l0_saved = resumed, resumed.l0_saved
        self.log.truncate_after(resumed.step - 1)
        if self.parallel.main:
            print(f"resumed from {found} at step {resumed.step}")
            note = schedule_note(self.cfg, resumed.step, resumed.total_steps, self.total_steps)
            if note:
                print(note)
        return resumed.step


class NullLog:
    """The metrics log of ranks other than 0: they compute the same numbers and write nothing."""

    def truncate_after(self, step: int) -> None:
        pass

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
