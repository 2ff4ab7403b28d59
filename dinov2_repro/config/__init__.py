"""Configuration: a typed schema (`schema.py`) and the defaults -> preset -> overrides loader (`loader.py`)."""

from .loader import ConfigError, config_to_dict, configs_dir, load_config, save_config, validate_config
from .schema import SSLConfig

__all__ = ["ConfigError", "SSLConfig", "config_to_dict", "configs_dir", "load_config", "save_config",
           "validate_config"]
