"""Tiny random models on both sides of the interop boundary, built locally (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch

from moelab.checkpoint import save_checkpoint
from moelab.config import Config, DataConfig, ModelConfig, MoEConfig

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
)


def hf_config(arch: str, **overrides):
    """A tiny transformers config of `arch` exercising its distinctive features."""
    import transformers as tf

    if arch == "mixtral":
        return tf.MixtralConfig(**{**COMMON, "intermediate_size": 32, "num_local_experts": 4, **overrides})
    if arch == "qwen2_moe":  # shared expert, q/k/v bias, a dense layer, un-normalised top-k
        return tf.Qwen2MoeConfig(
            **{
                **COMMON,
                "intermediate_size": 48,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 40,
                "num_experts": 4,
                "mlp_only_layers": [1],
                **overrides,
            }
        )
    if arch == "qwen3_moe":  # per-head qk-norm, explicit head_dim, normalised top-k, a dense layer
        return tf.Qwen3MoeConfig(
            **{
                **COMMON,
                "head_dim": 24,
                "intermediate_size": 48,
                "moe_intermediate_size": 32,
                "num_experts": 4,
                "norm_topk_prob": True,
                "mlp_only_layers": [0],
                **overrides,
            }
        )
    if arch == "olmoe":  # full-width qk-norm
        return tf.OlmoeConfig(**{**COMMON, "intermediate_size": 32, "num_experts": 4, **overrides})
    dense = {k: v for k, v in COMMON.items() if k != "num_experts_per_tok"}
    if arch == "llama":
        return tf.LlamaConfig(**{**dense, "intermediate_size": 48, **overrides})
    if arch == "qwen2":
        return tf.Qwen2Config(**{**dense, "intermediate_size": 48, **overrides})
    raise ValueError(arch)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Weights large enough that routing is decisive and norms are not all ones."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else std * noise)
    return model


def hf_model(arch: str, seed: int = 0, **overrides):
    import transformers as tf

    cls = {
        "mixtral": tf.MixtralForCausalLM,
        "qwen2_moe": tf.Qwen2MoeForCausalLM,
        "qwen3_moe": tf.Qwen3MoeForCausalLM,
        "olmoe": tf.OlmoeForCausalLM,
        "llama": tf.LlamaForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
    }[arch]
    return randomize(cls(hf_config(arch, **overrides)), seed).eval()


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def ml_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


@torch.no_grad()
def greedy(logits_fn, prompt: torch.Tensor, steps: int) -> list[int]:
    ids = prompt
    for _ in range(steps):
        ids = torch.cat([ids, logits_fn(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1] :].tolist()


def random_ids(vocab: int, shape=(3, 20), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def moelab_checkpoint(path: Path, tokenizer_dir: Path | None = None, seed: int = 0, **model_kw) -> Path:
    """A randomised moelab checkpoint directory (as training would write one)."""
    from moelab.model import Transformer

    moe = model_kw.pop("moe", MoEConfig(num_experts=4, top_k=2, expert_dim=32))
    cfg = Config(
        model=ModelConfig(
            **{
                "vocab_size": 128,
                "d_model": 64,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "ffn_dim": 48,
                "max_seq_len": 64,
                "moe": moe,
                **model_kw,
            }
        ),
        data=DataConfig(seq_len=64),
    )
    torch.manual_seed(seed)
    model = randomize(Transformer(cfg.model), seed)
    return save_checkpoint(path, model, cfg, tokenizer_dir)
