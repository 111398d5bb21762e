"""moelab: Mixture-of-Experts language models from raw text to a trained, analysed and served model.

The stable public API. `load`, `generate`, `stream_generate` and the interop entry points are imported on
first use, so `import moelab` does not pull in the server or converters.
"""

from moelab.config import Config, DataConfig, ModelConfig, MoEConfig, TrainConfig, load_config  # noqa: E402
from moelab.errors import ConfigError, UserError  # noqa: E402
from moelab.model import ModelOutput, MoELayer, RoutingStats, Transformer  # noqa: E402
from moelab.tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer  # noqa: E402

# `moelab.train(config)` is the training function; binding it here, after the subpackage import, keeps the
# name pointing at the function (later `import moelab.train.x` does not rebind an imported package).
from moelab.train import train  # noqa: E402
from moelab.version import __version__ as __version__  # noqa: E402

_LAZY = {
    "load": ("moelab.infer", "load"),
    "generate": ("moelab.infer", "generate"),
    "stream_generate": ("moelab.infer", "stream_generate"),
    "Engine": ("moelab.infer", "Engine"),
    "SamplingParams": ("moelab.infer", "SamplingParams"),
    "export_hf": ("moelab.interop.hf", "export_hf"),
    "import_hf": ("moelab.interop.hf", "import_hf"),
    "export_gguf": ("moelab.interop.gguf", "export_gguf"),
    "upcycle": ("moelab.interop.upcycle", "upcycle"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'moelab' has no attribute {name!r}")


__all__ = [
    "ByteTokenizer",
    "Config",
    "ConfigError",
    "DataConfig",
    "Engine",
    "ModelConfig",
    "ModelOutput",
    "MoEConfig",
    "MoELayer",
    "RoutingStats",
    "SamplingParams",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TrainConfig",
    "Transformer",
    "UserError",
    "export_gguf",
    "export_hf",
    "generate",
    "import_hf",
    "load",
    "load_config",
    "stream_generate",
    "train",
    "upcycle",
]
