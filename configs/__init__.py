"""Typed stage configs (pydantic), YAML presets and the loader that composes them."""

from flowspeed.configs.loader import ConfigError, dump_config, flatten, load_config, save_config
from flowspeed.configs.schema import (
    BucketsConfig,
    CaptionConfig,
    ClipConfig,
    ComponentConfig,
    CurateConfig,
    DataConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    PipelineConfig,
    TrackingConfig,
    TrainConfig,
)
from flowspeed.configs.validate import check_stage, config_problems, stage_problems

__all__ = [
    "BucketsConfig",
    "CaptionConfig",
    "ClipConfig",
    "CurateConfig",
    "ComponentConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoraConfig",
    "ModelConfig",
    "PipelineConfig",
    "TrackingConfig",
    "TrainConfig",
    "check_stage",
    "config_problems",
    "dump_config",
    "flatten",
    "load_config",
    "save_config",
    "stage_problems",
]
