"""Frozen, validated configuration objects."""

from kiln.config.engine import CacheConfig, ConfigError, SchedulerConfig
from kiln.config.model import ModelConfig

__all__ = ["CacheConfig", "ConfigError", "ModelConfig", "SchedulerConfig"]
