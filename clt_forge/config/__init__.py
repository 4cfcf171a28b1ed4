"""Configuration: typed schemas (schema.py) and Hydra composition/validation (compose.py)."""

from clt_forge.config.schema import (
    AttributeConfig,
    AutointerpConfig,
    CacheConfig,
    CLTConfig,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    QuantConfig,
    ServeConfig,
    ShardingConfig,
    SparsityConfig,
    TrainConfig,
)

__all__ = [
    "AttributeConfig",
    "AutointerpConfig",
    "CLTConfig",
    "CacheConfig",
    "DataConfig",
    "LoggerConfig",
    "ModelConfig",
    "QuantConfig",
    "ServeConfig",
    "ShardingConfig",
    "SparsityConfig",
    "TrainConfig",
]
