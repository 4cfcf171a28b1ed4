"""How `clt train` spreads over torchrun ranks (`sharding=`), applied from outside the plain
CrossLayerTranscoder: the module never knows it is distributed.

    mode     parameters on a rank            batch on a rank                 gradients
    single   all                             the global batch                local
    feature  a contiguous slice of features  the global batch (every rank)   exact without reduction
    ddp      all (replicated)                a disjoint 1/W of the batch     DDP all-reduce (mean)
    fsdp     1/W of every tensor (FSDP2)     a disjoint 1/W of the batch     FSDP2 reduce-scatter (mean)

`batch_size` is the global batch at every world size, so one config trains the same CLT at any
W (up to float summation order): the data-parallel loss is a per-rank mean over equal shares,
and the mean of those means is the global mean. One process (W = 1) is `single` whatever the
mode says. Rank 0 alone logs; every rank takes part in evaluation and checkpointing.
"""

from __future__ import annotations

import gc
import warnings
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from clt_forge.clt.loss import LossTerms, clt_loss
from clt_forge.clt.model import CLTOutput, CrossLayerTranscoder
from clt_forge.config.schema import ShardingMode, TrainConfig
from clt_forge.distributed.feature_sharding import FeatureShardedCLT, clip_global_norm, deferred_sink, feature_slice
from clt_forge.distributed.setup import DistEnv, dist_env
from clt_forge.errors import CLTError

if TYPE_CHECKING:  # the training package imports this module (a runtime import would be circular)
    from clt_forge.artifacts.checkpoint import CheckpointInfo
    from clt_forge.artifacts.normalization import Normalization

__all__ = ["Parallel", "start_parallel"]


class Parallel:
    """sharding=single: one process, no collectives. The other modes override what differs."""

    mode = ShardingMode.single

    def __init__(self, env: DistEnv):
        self.env = env
        self.device = env.device

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world(self) -> int:
        return self.env.world_size

    @property
    def main(self) -> bool:
        return self.env.rank == 0

    # -- data ---------------------------------------------------------------------------------
    @property
    def data_rank(self) -> int:
        """Which share of the dataset this rank reads (ActivationReader's rank)."""
        return 0

    @property
    def data_world(self) -> int:
        return 1

    def local_batch_size(self, batch_size: int) -> int:
        return batch_size

    def global_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The whole step's batch (rank order) from this rank's share: what the encoder-bias init reads."""
        return x

    # -- model ----------------------------------------------------------------------------------
    def features(self, d_features: int) -> slice:
        """The features of every layer this rank holds."""
        return slice(0, d_features)

    def wrap(self, clt: CrossLayerTranscoder) -> nn.Module:
        """The module whose forward a training step calls (the CLT itself here)."""
        return clt

    def loss(
        self, clt: CrossLayerTranscoder, output: CLTOutput, y: torch.Tensor, lambda0: float, c: float, dead: float
    ) -> tuple[LossTerms, LossTerms]:
        """(the terms to backpropagate on this rank, the global terms to log)."""
        terms = clt_loss(output, y, output.decoder_norms, clt.jumprelu_threshold(), lambda0, c, dead)
        return terms, terms

    def clip_grad_norm(self, clt: CrossLayerTranscoder, max_norm: float) -> torch.Tensor:
        """The global gradient norm (before clipping), clipping to `max_norm` when it is > 0."""
        params = [p for p in clt.parameters() if p.grad is not None]
        sink = deferred_sink(clt)
        if sink is not None:  # optim.decoder_grad=blocks: W_dec's gradient is counted from its blocks
            return clip_global_norm([g for p in params if (g := p.grad) is not None], [], max_norm, sink)
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))

    def grad_scaler(self, enabled: bool, init_scale: float) -> torch.amp.GradScaler:
        """The fp16 loss scaler: the trainer unscales before `clip_grad_norm`, so the clip sees
        true gradients; an inf/NaN gradient skips the optimizer step and lowers the scale."""
        return torch.amp.GradScaler(self.device.type, init_scale=init_scale, enabled=enabled)

    def fired(self, features: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(which of this rank's features fired anywhere in the step's global batch, its tokens)."""
        return (features != 0).any(0), features.shape[0]

    def l0_mean(self, features: torch.Tensor) -> float:
        """Mean active features per token and layer over the global batch and all features."""
        return float((features != 0).sum(-1).float().mean())

    def sum_features(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-layer counts over this rank's features -> over all features."""
        return counts

    def eval_module(self, module: nn.Module) -> nn.Module:
        return module

    def after_eval(self, module: nn.Module) -> None:
        """Put the module back in its training state after a no-grad forward."""

    # -- checkpoints ----------------------------------------------------------------------------
    def full_tensors(self, tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
        """This rank's tensors as plain tensors of what a checkpoint holds for this rank."""
        return {name: t.detach() for name, t in tensors.items()}

    def save(
        self,
        folder: Path,
        weights: dict[str, torch.Tensor],
        normalization: Normalization,
        info: CheckpointInfo,
        state: dict[str, Any] | None,
        state_tensors: dict[str, torch.Tensor] | None,
    ) -> None:
        """Collective: write the checkpoint (rank 0 writes one file set; sharded modes one per rank)."""
        from clt_forge.artifacts.checkpoint import save_checkpoint

        if self.main:
            save_checkpoint(folder, weights, normalization, info, state, state_tensors)
        self.barrier()

    def gather_ints(self, value: int) -> list[int]:
        return [value]

    def broadcast_object(self, value: Any) -> Any:
        return value

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Distributed(Parallel):
    """What every multi-process mode shares: collectives over the default group."""

    def gather_ints(self, value: int) -> list[int]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return [int(v) for v in out]

    def broadcast_object(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            gc.collect()  # free autograd cycles while the group's threads still run (else: rare abort at exit)
            dist.destroy_process_group()

    def grad_scaler(self, enabled: bool, init_scale: float) -> torch.amp.GradScaler:
        return RankSyncedGradScaler(self.device.type, init_scale=init_scale, enabled=enabled)

    def _mean(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        stacked = torch.stack([v.detach().float() for v in values])
        dist.all_reduce(stacked)
        return list(stacked / self.world)


class RankSyncedGradScaler(torch.amp.GradScaler):
    """A rank holds a slice of the gradients (feature, fsdp) or a copy (ddp): the inf/NaN finding
    of `unscale_` (0.0 or 1.0) is maxed over ranks, so every rank skips the same steps and keeps
    the same scale. Not torch's ShardedGradScaler: its finding has shape [1], which the fused
    Adam step refuses, and is summed, while fused Adam skips only on exactly 1.0."""

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        if self.is_enabled():
            for found_inf in self._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)


class FeatureParallel(_Distributed):
    """sharding=feature (the paper's): every rank holds a contiguous slice of every layer's
    features and sees the same batch: each reads and decodes the same chunks (simple, the same
    resume position everywhere; reading once and broadcasting measured ~30% cheaper on CPU, see
    docs/performance.md); partial reconstructions are summed with an all-reduce whose backward
    is the identity (clt_forge/distributed/feature_sharding.py)."""

    mode = ShardingMode.feature

    def features(self, d_features: int) -> slice:
        return feature_slice(d_features, self.rank, self.world)

    def wrap(self, clt: CrossLayerTranscoder) -> nn.Module:
        return FeatureShardedCLT(clt)

    def loss(
        self, clt: CrossLayerTranscoder, output: CLTOutput, y: torch.Tensor, lambda0: float, c: float, dead: float
    ) -> tuple[LossTerms, LossTerms]:
        return FeatureShardedCLT(clt).loss(output, y, lambda0, c, dead)

    def clip_grad_norm(self, clt: CrossLayerTranscoder, max_norm: float) -> torch.Tensor:
        return FeatureShardedCLT(clt).clip_grad_norm_(max_norm)

    def l0_mean(self, features: torch.Tensor) -> float:
        local = (features != 0).sum(-1).float().mean().reshape(1)
        dist.all_reduce(local)
        return float(local)

    def sum_features(self, counts: torch.Tensor) -> torch.Tensor:
        counts = counts.clone()
        dist.all_reduce(counts)
        return counts

    def save(
        self,
        folder: Path,
        weights: dict[str, torch.Tensor],
        normalization: Normalization,
        info: CheckpointInfo,
        state: dict[str, Any] | None,
        state_tensors: dict[str, torch.Tensor] | None,
    ) -> None:
        from clt_forge.distributed.checkpoint import save_sharded_checkpoint

        save_sharded_checkpoint(folder, weights, normalization, info, state, state_tensors)


class DataParallel(_Distributed):
    """sharding=ddp: replicated CLT, disjoint chunks per rank, DDP averages the gradients."""

    mode = ShardingMode.ddp

    @property
    def data_rank(self) -> int:
        return self.rank

    @property
    def data_world(self) -> int:
        return self.world

    def local_batch_size(self, batch_size: int) -> int:
        if batch_size % self.world:
            raise CLTError(
                f"batch_size={batch_size} is the global batch; with sharding={self.mode.value} on "
                f"{self.world} ranks it must be a multiple of {self.world}."
            )
        return batch_size // self.world

    def global_batch(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def wrap(self, clt: CrossLayerTranscoder) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(clt, device_ids=device_ids)

    def loss(
        self, clt: CrossLayerTranscoder, output: CLTOutput, y: torch.Tensor, lambda0: float, c: float, dead: float
    ) -> tuple[LossTerms, LossTerms]:
        terms = clt_loss(output, y, output.decoder_norms, clt.jumprelu_threshold(), lambda0, c, dead)
        total, mse, sparsity, dead_term = self._mean([terms.total, terms.mse, terms.sparsity, terms.dead])
        return terms, LossTerms(total=total, mse=mse, sparsity=sparsity, dead=dead_term)

    def fired(self, features: torch.Tensor) -> tuple[torch.Tensor, int]:
        fired = (features != 0).any(0).to(torch.uint8)
        dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        return fired.bool(), features.shape[0] * self.world

    def l0_mean(self, features: torch.Tensor) -> float:
        return float(self._mean([(features != 0).sum(-1).float().mean()])[0])

    def eval_module(self, module: nn.Module) -> nn.Module:
        inner = getattr(module, "module", module)  # DDP's wrapped CLT: no gradient sync to set up
        assert isinstance(inner, nn.Module)
        return inner


class FullyShardedParallel(DataParallel):
    """sharding=fsdp: torch's FSDP2 (`fully_shard`): every tensor split across ranks, gathered
    for the forward; disjoint chunks per rank as in ddp. Checkpoints gather the full tensors to
    rank 0 (the plain layout); for CLTs too large for one host's memory use sharding=feature."""

    mode = ShardingMode.fsdp

    def wrap(self, clt: CrossLayerTranscoder) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        clt.grad_buffer = None  # FSDP frees the unsharded gradient itself after reduce-scatter
        mesh = init_device_mesh(self.device.type, (self.world,))
        fully_shard(clt, mesh=mesh)
        return clt

    def clip_grad_norm(self, clt: CrossLayerTranscoder, max_norm: float) -> torch.Tensor:
        params = [p for p in clt.parameters() if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def eval_module(self, module: nn.Module) -> nn.Module:
        return module

    def after_eval(self, module: nn.Module) -> None:
        module.reshard()  # type: ignore[operator]  # the root keeps gathered parameters after a forward

    def full_tensors(self, tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach() for n, t in tensors.items()}


MODES: dict[ShardingMode, type[Parallel]] = {
    ShardingMode.single: Parallel,
    ShardingMode.feature: FeatureParallel,
    ShardingMode.ddp: DataParallel,
    ShardingMode.fsdp: FullyShardedParallel,
}


def start_parallel(cfg: TrainConfig) -> Parallel:
    """This process's place in the run: joins the process group under torchrun / SLURM."""
    env = dist_env(backend=cfg.sharding.backend, cuda=_use_cuda(cfg.device))
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise CLTError(f"device={cfg.device!r}: use auto, cpu or cuda.")
    if not env.distributed:
        if cfg.sharding.mode is not ShardingMode.single:
            print(f"note: sharding={cfg.sharding.mode.value} in one process is sharding=single.")
        return Parallel(env)
    if cfg.sharding.mode is ShardingMode.single:
        raise CLTError(
            f"sharding=single with {env.world_size} processes (WORLD_SIZE): every rank would train its own "
            "copy; choose sharding=feature, ddp or fsdp."
        )
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if not dist.is_initialized():
        dist.init_process_group(
            env.backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=30),
            device_id=env.device if env.device.type == "cuda" else None,
        )
    return MODES[cfg.sharding.mode](env)


def _use_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLTError(f"device={device}: no CUDA device is visible to this process.")
        return True
    return torch.cuda.is_available()
