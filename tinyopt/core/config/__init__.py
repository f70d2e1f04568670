"""The config of a sweep: TOML files, presets, ``--set`` overrides, checked once and typed.

``loader`` reads and checks the files (``load_config``); ``sections`` holds the typed result
(``Config``, one frozen dataclass per TOML section). Only this package reads a config as TOML tables:
everything else reads the attributes of a ``Config``.
"""

from tinyopt.core.config.loader import APPROACHES, default_config_path, load_config, preset_path, presets, sweeps_dir
from tinyopt.core.config.sections import Config, DataConfig, EnsembleConfig, ModelConfig, StudyConfig, TrainConfig

__all__ = ["APPROACHES", "Config", "DataConfig", "EnsembleConfig", "ModelConfig", "StudyConfig", "TrainConfig",
           "default_config_path", "load_config", "preset_path", "presets", "sweeps_dir"]
