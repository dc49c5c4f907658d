"""Typed, validated YAML configs for every stage (see loader for includes and overrides)."""

from lmforge.config.base import StrictModel
from lmforge.config.describe import config_help
from lmforge.config.loader import ConfigError, load_config, save_config, to_yaml

__all__ = ["ConfigError", "StrictModel", "config_help", "load_config", "save_config", "to_yaml"]
