"""Frozen, validated configuration objects."""

from kiln.config.engine import CacheConfig, ConfigError, SchedulerConfig
from kiln.config.engine_args import EngineArgs
from kiln.config.model import ModelConfig

__all__ = ["CacheConfig", "ConfigError", "EngineArgs", "ModelConfig", "SchedulerConfig"]
