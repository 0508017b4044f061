"""Typed run configuration: the schema (``schema.py``) and YAML + ``--set`` loading
(``loader.py``), re-exported here so callers have one import.

    from megatron_mel.config import RunConfig, load_config
"""

from megatron_mel.config.loader import dump_yaml as dump_yaml
from megatron_mel.config.loader import flatten as flatten
from megatron_mel.config.loader import from_dict as from_dict
from megatron_mel.config.loader import load_config as load_config
from megatron_mel.config.loader import not_utf8 as not_utf8
from megatron_mel.config.loader import to_dict as to_dict
from megatron_mel.config.schema import RENAMED_KEYS as RENAMED_KEYS
from megatron_mel.config.schema import AlgorithmConfig as AlgorithmConfig
from megatron_mel.config.schema import CheckpointConfig as CheckpointConfig
from megatron_mel.config.schema import ConfigError as ConfigError
from megatron_mel.config.schema import DataConfig as DataConfig
from megatron_mel.config.schema import DType as DType
from megatron_mel.config.schema import LaunchConfig as LaunchConfig
from megatron_mel.config.schema import ModelConfig as ModelConfig
from megatron_mel.config.schema import OptimConfig as OptimConfig
from megatron_mel.config.schema import ParallelConfig as ParallelConfig
from megatron_mel.config.schema import ReflectionConfig as ReflectionConfig
from megatron_mel.config.schema import RewardConfig as RewardConfig
from megatron_mel.config.schema import RolloutConfig as RolloutConfig
from megatron_mel.config.schema import RunConfig as RunConfig
from megatron_mel.config.schema import ServerConfig as ServerConfig
from megatron_mel.config.schema import TrackingConfig as TrackingConfig
from megatron_mel.config.schema import TrainerConfig as TrainerConfig
