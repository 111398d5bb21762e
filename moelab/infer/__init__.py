"""Generation and serving: KV cache, sampling, the continuous-batching engine, the OpenAI-compatible server."""

from moelab.infer.generate import generate, load, stream_generate
from moelab.infer.kv_cache import KVCache
from moelab.infer.sampling import SamplingParams
from moelab.infer.scheduler import Engine

__all__ = ["Engine", "KVCache", "SamplingParams", "generate", "load", "stream_generate"]
