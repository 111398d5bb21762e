"""Fixtures for routing replay / RL / deterministic-mode tests: a tiny random MoE per router and a
byte-level tokenizer (no download, no training)."""

import pytest
import torch

from moelab.config import ModelConfig, MoEConfig
from moelab.model import Transformer


class BytesTokenizer:
    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_model(seed: int = 0, layers: int = 2, **moe) -> Transformer:
    torch.manual_seed(seed)
    moe_cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_dim": 32, **moe})
    cfg = ModelConfig(
        vocab_size=257, d_model=32, n_layers=layers, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=96, moe=moe_cfg
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights than init: routing decisions are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return BytesTokenizer()


@pytest.fixture(scope="session")
def make_model():
    return tiny_model
