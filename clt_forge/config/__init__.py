"""Configuration: typed schemas (schema.py, schedules.py) and Hydra composition/validation (compose.py)."""

from clt_forge.artifacts.quant_spec import QuantSpec
from clt_forge.config.schedules import SparsityConfig
from clt_forge.config.schema import (
    AttributeConfig,
    AttributionSettings,
    AutointerpConfig,
    CacheConfig,
    CLTConfig,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    ServeConfig,
    ShardingConfig,
    TrainConfig,
)

__all__ = [
    "AttributeConfig",
    "AttributionSettings",
    "AutointerpConfig",
    "CLTConfig",
    "CacheConfig",
    "DataConfig",
    "LoggerConfig",
    "ModelConfig",
    "QuantSpec",
    "ServeConfig",
    "ShardingConfig",
    "SparsityConfig",
    "TrainConfig",
]
