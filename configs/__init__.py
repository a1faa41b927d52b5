"""Typed stage configs (pydantic), YAML presets and the loader that composes them."""

from configs.loader import ConfigError, dump_config, flatten, load_config, save_config
from configs.schema import (
    ClipConfig,
    ComponentConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    PipelineConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "ClipConfig",
    "ComponentConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "PipelineConfig",
    "TrackingConfig",
    "TrainConfig",
    "dump_config",
    "flatten",
    "load_config",
    "save_config",
]
