"""Checkpoints of a feature-sharded run: each rank writes its own shard, rank 0 the index.

The folder has the normal checkpoint layout (clt_forge/artifacts/checkpoint.py) with one
clt.shard-RRR-of-WWW.safetensors per rank (and training_state.shard-RRR-of-WWW.safetensors
when it is resumable) and a "shards" entry in config.json; it is written into a temporary
sibling and renamed into place by rank 0 after every rank has written (barriers around), so a
reader never sees a partial checkpoint. `read_tensors` reads any feature range back: the full
CLT for consumers, a rank's slice for a resumed run of any world size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from clt_forge.artifacts.checkpoint import (
    CONFIG,
    STATE_STEM,
    TRAINING_STATE,
    WEIGHTS_STEM,
    CheckpointInfo,
    install,
    shard_file,
    weight_tensors,
    write_tensors,
)
from clt_forge.artifacts.normalization import Normalization
from clt_forge.clt.model import CrossLayerTranscoder
from clt_forge.distributed.feature_sharding import feature_slice

__all__ = ["save_sharded_checkpoint", "shard_name"]


def shard_name(rank: int, world: int) -> str:
    return shard_file(WEIGHTS_STEM, rank, world)


def save_sharded_checkpoint(
    folder: Path,
    local: CrossLayerTranscoder | dict[str, torch.Tensor],
    normalization: Normalization,
    info: CheckpointInfo,
    training_state: dict[str, Any] | None = None,
    state_tensors: dict[str, torch.Tensor] | None = None,
    group: Any = None,
) -> Path:
    """Collective: every rank of `group` calls it with its slice (`local`, module or state dict),
    its slice of `state_tensors`, and the full-CLT info; rank 0's `training_state` is written."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    scratch = folder.with_name(f".{folder.name}-partial")
    if rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    dist.barrier(group)
    write_tensors(scratch / shard_name(rank, world), weight_tensors(local, normalization))
    if training_state is not None:
        write_tensors(scratch / shard_file(STATE_STEM, rank, world), state_tensors or {})
    dist.barrier(group)
    if rank == 0:
        slices = [feature_slice(info.d_features, r, world) for r in range(world)]
        info.shards = {
            "world": world,
            "files": [shard_name(r, world) for r in range(world)],
            "slices": [[s.start, s.stop] for s in slices],
        }
        (scratch / CONFIG).write_text(json.dumps(info.__dict__, indent=1, default=str))
        if training_state is not None:
            torch.save(training_state, scratch / TRAINING_STATE)
        install(scratch, folder)
        info.shards = None
    dist.barrier(group)
    return folder
