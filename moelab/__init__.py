"""moelab: Mixture-of-Experts language models from raw text to a trained, analysed and served model."""

__version__ = "0.1.0"

from moelab.config import Config, DataConfig, ModelConfig, MoEConfig, TrainConfig, load_config  # noqa: E402
from moelab.errors import ConfigError, UserError  # noqa: E402
from moelab.model import ModelOutput, MoELayer, RoutingStats, Transformer  # noqa: E402

__all__ = [
    "Config", "ConfigError", "DataConfig", "ModelConfig", "MoEConfig", "ModelOutput", "MoELayer",
    "RoutingStats", "TrainConfig", "Transformer", "UserError", "load_config",
]
