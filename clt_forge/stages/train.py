"""`clt train`: train a CLT (see clt_forge/training/runner.py).

`resume=<run dir>` continues that run with the configuration it recorded (train_config.json),
so `clt train resume=RUN` needs no other argument. KEY=VALUE overrides given with it apply on
top (the runner refuses ones that change the architecture); group choices (model=...) are
ignored: the run's own choices hold.

Under torchrun (`torchrun --nproc_per_node=N -m clt_forge train sharding=feature ...`) every
rank runs this; `sharding=` decides how they split the work (clt_forge/distributed/parallel.py).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from clt_forge.config.schedules import SPARSITY_SCHEDULES
from clt_forge.config.schema import TrainConfig
from clt_forge.training.runner import CLTTrainingRunner, read_run_config


def run(cfg: TrainConfig) -> Path:
    if cfg.resume and not cfg.plot:
        cfg = recorded_config(cfg)
    return CLTTrainingRunner(cfg).run()


def recorded_config(cfg: TrainConfig) -> TrainConfig:
    recorded = read_run_config(Path(cfg.resume or ""))
    given = OmegaConf.from_dotlist(_explicit_overrides())
    base = OmegaConf.structured(TrainConfig)
    schedule = recorded.get("sparsity", {}).get("schedule")
    if schedule is not None:  # the recorded schedule's own settings need its own schema
        base.sparsity = OmegaConf.structured(SPARSITY_SCHEDULES.lookup(schedule))
    merged = OmegaConf.merge(base, recorded, given, {"out": cfg.resume})
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _explicit_overrides() -> list[str]:
    """The KEY=VALUE arguments of this command line (empty outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    from clt_forge.config.compose import GROUPS

    try:
        task = list(HydraConfig.get().overrides.task)
    except ValueError:
        return []
    keys = [o for o in task if "=" in o and not o.startswith("~")]
    return [o.lstrip("+") for o in keys if o.split("=", 1)[0].lstrip("+") not in GROUPS]
