from hcx_megatron.config.args import (  # noqa: F401
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    LoggingConfig,
    ParallelConfig,
    RuntimeConfig,
    TrainingConfig,
    build_parser,
    parse_config,
    validate_config,
)
from hcx_megatron.config.frozen import FrozenConfigError, freeze  # noqa: F401
from hcx_megatron.config.model import PRESETS, ModelConfig, get_preset  # noqa: F401
