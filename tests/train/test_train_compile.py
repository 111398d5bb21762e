"""`train.compile`: which blocks are compiled whole (router and experts included) and which only in parts."""

import torch

from moelab.config import ModelConfig, MoEConfig
from moelab.model import Transformer
from moelab.parallel.compute import compile_blocks


def _model(backend: str) -> Transformer:
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=3,
        n_heads=4,
        ffn_dim=64,
        max_seq_len=16,
        moe=MoEConfig(num_experts=4, top_k=2, expert_dim=16, layers=[0, 2], expert_backend=backend),
    )
    return Transformer(cfg)


def _compiled(model, monkeypatch, device, dtype) -> tuple[int, list[str]]:
    names = {id(m): n for n, m in model.named_modules()}
    calls: list[str] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append(names[id(self)]))
    return compile_blocks(model, torch.device(device), dtype), calls


def test_sync_free_moe_blocks_compile_whole(monkeypatch, gpu_capability):
    model = _model("auto")
    whole, calls = _compiled(model, monkeypatch, "cuda", torch.bfloat16)  # auto -> grouped_mm on an sm90 GPU
    assert whole == 3 and calls == ["layers.0", "layers.1", "layers.2"]
    gpu_capability((8, 0))  # an A100: torch's grouped matmul reads group sizes on the host there
    whole, calls = _compiled(_model("grouped_mm"), monkeypatch, "cuda", torch.bfloat16)
    assert whole == 1 and calls == ["layers.0.attn", "layers.1", "layers.2.attn"]


def test_host_planned_moe_blocks_compile_attention_only(monkeypatch):
    model = _model("auto")
    whole, calls = _compiled(model, monkeypatch, "cpu", torch.bfloat16)  # auto -> cpu_buckets
    assert whole == 1 and calls == ["layers.0.attn", "layers.1", "layers.2.attn"]
    whole, calls = _compiled(_model("grouped_mm"), monkeypatch, "cpu", torch.bfloat16)
    assert whole == 3
