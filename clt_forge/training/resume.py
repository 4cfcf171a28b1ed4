"""The resumable training state: what a checkpoint holds beyond the weights so that `resume=`
continues the same loss curve, and how a rank of any world size reads its share back.

training_state.pt (torch.save of a dict; docs/formats.md): step, adam_step, readers (tokens each
data rank consumed), data_world, dead_tokens, l0_saved, rng, grad_scaler (GradScaler.state_dict():
empty unless precision=fp16), trainable (LoRA adapters only). Beside it, training_state*.safetensors:
Adam moments by parameter name and the dead-feature counters (clt_forge/artifacts/checkpoint.py).
Both the step-* checkpoints and the final one carry it, so a finished run can be trained longer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from clt_forge.artifacts.checkpoint import STATE_STEM, TRAINING_STATE, WEIGHTS_STEM, read_info, read_tensors
from clt_forge.clt import CrossLayerTranscoder
from clt_forge.config.schema import TrainConfig
from clt_forge.data.store import ActivationsStore
from clt_forge.distributed.parallel import Parallel
from clt_forge.errors import CLTError
from clt_forge.training.metrics import DeadFeatures
from clt_forge.training.schedules import l0_coefficient, lr_multiplier


@dataclasses.dataclass
class Resumed:
    """What `restore` read that is applied later, once the optimizer and scaler exist."""

    step: int
    adam_step: float
    moments: dict[str, torch.Tensor]  # this rank's Adam moments by "exp_avg.NAME" / "exp_avg_sq.NAME"
    l0_saved: list[float]
    grad_scaler: dict[str, Any]
    total_steps: int  # the length of the run that wrote it (its tokens // batch_size)


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete resumable checkpoint of a run (step-* or final)."""
    folders = [*(run / "checkpoints").glob("step-*"), run / "checkpoints" / "final"]
    candidates = [p for p in folders if (p / TRAINING_STATE).is_file()]
    return max(candidates, key=lambda p: read_info(p).step, default=None)


def training_state(
    step: int,
    clt: CrossLayerTranscoder,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    parallel: Parallel,
    store: ActivationsStore,
    dead: DeadFeatures,
    l0_saved: list[float],
    lora: bool,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(scalars and small things, this rank's tensors: Adam moments by parameter name, dead counters).
    Collective: the data positions are gathered from every rank."""
    moments: dict[str, torch.Tensor] = {}
    adam_step = 0.0
    for name, param in clt.named_parameters():
        found = optimizer.state.get(param)
        if found:
            moments[f"exp_avg.{name}"], moments[f"exp_avg_sq.{name}"] = found["exp_avg"], found["exp_avg_sq"]
            adam_step = float(found["step"])
    tensors = parallel.full_tensors(moments)
    tensors["dead.last_fired"] = dead.last_fired
    state = {
        "step": step,
        "adam_step": adam_step,
        "readers": parallel.gather_ints(store.tokens_served),  # tokens consumed, per data rank
        "data_world": parallel.data_world,
        "dead_tokens": dead.tokens,
        "l0_saved": list(l0_saved),
        "rng": torch.get_rng_state(),
        "grad_scaler": scaler.state_dict(),  # the same on every rank (inf/NaN findings are summed)
    }
    if lora:  # the checkpoint holds merged weights; keep the adapters
        state["trainable"] = {n: p.detach().clone() for n, p in clt.named_parameters() if p.requires_grad}
    return state, tensors


def restore(
    found: Path,
    clt: CrossLayerTranscoder,
    features: slice,
    parallel: Parallel,
    store: ActivationsStore,
    dead: DeadFeatures,
    lora: bool,
) -> Resumed:
    """Load this rank's slice of checkpoint `found` (written at any world size, in any sharding
    mode) into the CLT, the dead-feature counters, the RNG and the reader's position."""
    if store.reader is None:
        raise CLTError("resume needs a cached dataset (activations=PATH): on-the-fly batches cannot be replayed.")
    info = read_info(found)
    state = torch.load(found / TRAINING_STATE, weights_only=False)
    if "readers" not in state:
        raise CLTError(f"{found}: written by an older clt-forge (training state without 'readers'); cannot resume.")
    device = parallel.device
    with torch.no_grad():
        params = dict(clt.named_parameters())
        if lora:
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        else:
            weights = read_tensors(found, WEIGHTS_STEM, info, features, device=device)
            if ("W_skip" in weights) != (clt.W_skip is not None):
                raise CLTError(
                    f"{found}: the checkpoint was trained with clt.skip={'W_skip' in weights} and this run has "
                    f"clt.skip={clt.W_skip is not None}; resume with the setting it was trained with."
                )
            clt.load_state_dict({k: v for k, v in weights.items() if not k.startswith("norm.")})
    tensors = read_tensors(found, STATE_STEM, info, features)  # on the CPU: load_optimizer_state casts, then moves
    dead.load({"tokens": state["dead_tokens"], "last_fired": tensors.pop("dead.last_fired").cpu()})
    torch.set_rng_state(state["rng"])
    readers, world = state["readers"], parallel.data_world
    if state["data_world"] == world:
        position = readers[parallel.data_rank]
    else:
        position = sum(readers[: state["data_world"]]) // world
        if parallel.main:
            print(
                f"note: {found} was written with {state['data_world']} data-parallel ranks, this run has {world}: "
                "the weights and optimizer continue exactly, the data order starts afresh at the same token count."
            )
    store.reader.start_tokens = store.reader.tokens_served = position
    return Resumed(
        step=int(state["step"]),
        adam_step=state["adam_step"],
        moments=tensors,
        l0_saved=state["l0_saved"],
        grad_scaler=state.get("grad_scaler", {}),  # absent: written before fp16 had a scaler
        total_steps=max(1, info.train["tokens"] // info.train["batch_size"]) if info.train else int(state["step"]),
    )


def schedule_note(cfg: TrainConfig, step: int, before: int, now: int) -> str | None:
    """What changes at the resume step when tokens= changed: every schedule is a function of
    step / total_steps, so the rest of the run follows the plan of the new length."""
    if before == now:
        return None
    lr = [cfg.optim.lr * lr_multiplier(step, total, cfg.optim) for total in (before, now)]
    l0 = [l0_coefficient(step, total, cfg.sparsity) for total in (before, now)]
    return (
        f"note: the run was planned for {before} steps, now {now} (tokens={cfg.tokens}): the lr and sparsity "
        f"schedules follow the {now}-step plan from step {step} on (lr {lr[0]:.3g} -> {lr[1]:.3g}, "
        f"l0_coefficient {l0[0]:.3g} -> {l0[1]:.3g})."
    )


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    clt: CrossLayerTranscoder,
    resumed: Resumed,
    device: torch.device,
    exp_avg_dtypes: Mapping[str, torch.dtype] | None = None,
) -> None:
    """Adam state from checkpoint tensors (this rank's features; FSDP takes its own shard) and
    the loss scaler's scale and growth tracker. The moments take their parameter's dtype, or for
    exp_avg the one `exp_avg_dtypes` names (optim.exp_avg_dtype=bfloat16: W_dec's), cast before
    they reach the device; each is dropped from `resumed` once loaded."""
    for name, param in clt.named_parameters():
        if f"exp_avg.{name}" not in resumed.moments:
            continue
        dtypes = {"exp_avg": (exp_avg_dtypes or {}).get(name, param.dtype), "exp_avg_sq": param.dtype}
        pair = [resumed.moments.pop(f"{kind}.{name}").to(dtype).to(device) for kind, dtype in dtypes.items()]
        if hasattr(param, "device_mesh"):  # an FSDP2 DTensor parameter
            from torch.distributed.tensor import distribute_tensor

            pair = [distribute_tensor(t, param.device_mesh, param.placements) for t in pair]  # type: ignore[attr-defined]
        step = torch.tensor(resumed.adam_step, dtype=torch.float32, device=device)
        optimizer.state[param] = {"step": step, "exp_avg": pair[0], "exp_avg_sq": pair[1]}
    if resumed.grad_scaler and scaler.is_enabled():
        scaler.load_state_dict(resumed.grad_scaler)
