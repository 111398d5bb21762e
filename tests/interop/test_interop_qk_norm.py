"""The qk-norm attention variants added for Qwen3 / OLMoE interop: counted right, and incremental
decoding through the KV cache equals the full forward."""

import pytest
import torch
from interop_helpers import randomize

from moelab.config import ModelConfig, MoEConfig
from moelab.infer.kv_cache import KVCache
from moelab.model import Transformer
from moelab.model.counting import count_params
from moelab.model.layers import FullQKNormAttention, HeadQKNormAttention

pytestmark = pytest.mark.slow  # end to end (subprocesses, torchrun, transformers, benchmarks)


@pytest.mark.parametrize("qk_norm,cls", [("head", HeadQKNormAttention), ("full", FullQKNormAttention)])
def test_qk_norm_model_counts_and_decodes(qk_norm, cls):
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=12,
        max_seq_len=32,
        qk_norm=qk_norm,
        moe=MoEConfig(num_experts=4, top_k=2, expert_dim=16),
    )
    torch.manual_seed(0)
    model = randomize(Transformer(cfg), seed=5, std=0.3).eval()
    assert isinstance(model.layers[0].attn, cls)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())
    shapes = {"head": (12,), "full": (48,)}[qk_norm], {"head": (12,), "full": (24,)}[qk_norm]
    assert (model.layers[1].attn.q_norm.weight.shape, model.layers[1].attn.k_norm.weight.shape) == shapes

    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.for_model(model, 1)
        positions, mask = cache.prefill(slice(0, 1), [0], 8)
        steps = [model(ids[:, :8], positions=positions, cache=cache, attn_mask=mask).logits]
        for t in range(8, 12):
            positions, mask = cache.extend(slice(0, 1))
            steps.append(model(ids[:, t : t + 1], positions=positions, cache=cache, attn_mask=mask).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_qk_norm_is_validated():
    from moelab.config import from_dict
    from moelab.errors import ConfigError

    with pytest.raises(ConfigError, match="qk_norm: expected one of none, head, full, got 'qwen'"):
        from_dict(ModelConfig, {"qk_norm": "qwen"})
