"""Frozen, validated configuration objects."""

from kiln.config.model import ModelConfig

__all__ = ["ModelConfig"]
