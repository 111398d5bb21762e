"""The fused LM head + cross-entropy equals the unfused reference, values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

import moelab.model.lm_loss as lm_loss
from moelab.config import ModelConfig, MoEConfig
from moelab.model import Transformer
from moelab.model.lm_loss import IGNORE_INDEX, linear_cross_entropy


def reference(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("chunk_bytes", [4 << 20, 3000])  # one chunk, and many ragged chunks
def test_fused_equals_reference(dtype, chunk_bytes, monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    n, d, v = 67, 24, 50
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = (torch.randn(v, d, generator=g) * 0.3).requires_grad_(True)
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = IGNORE_INDEX
    results = []
    for fn in (reference, linear_cross_entropy):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss = fn(h, w, t)
        results.append((loss, *torch.autograd.grad(2.5 * loss, (h, w))))  # a scaled upstream gradient
    tol = dict(rtol=1e-5, atol=1e-6) if dtype is None else dict(rtol=2e-2, atol=2e-3)
    for got, want, name in zip(results[1], results[0], ["loss", "dh", "dw"], strict=True):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, **tol, msg=name)


def test_all_targets_ignored_is_nan_like_torch():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    t = torch.full((4,), IGNORE_INDEX)
    assert math.isnan(float(linear_cross_entropy(h, w, t))) and math.isnan(float(reference(h, w, t)))


def test_no_grad_needs_no_gradient_buffer():
    h, w, t = torch.randn(6, 8), torch.randn(10, 8), torch.randint(0, 10, (6,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), reference(h, w, t))


@pytest.mark.parametrize("tie", [False, True])
def test_model_loss_without_logits_equals_default(tie):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=40,
        d_model=16,
        n_layers=2,
        n_heads=2,
        ffn_dim=32,
        max_seq_len=16,
        tie_embeddings=tie,
        moe=MoEConfig(num_experts=4, top_k=2, expert_dim=8),
    )
    model = Transformer(cfg)
    x, y = torch.randint(0, 40, (2, 9)), torch.randint(0, 40, (2, 9))
    y[0, :3] = IGNORE_INDEX
    out_full = model(x, y)
    grads_full = torch.autograd.grad(out_full.loss, list(model.parameters()), allow_unused=True)
    out_fused = model(x, y, return_logits=False)
    grads_fused = torch.autograd.grad(out_fused.loss, list(model.parameters()), allow_unused=True)
    assert out_fused.logits is None and out_full.logits.shape == (2, 9, 40)
    torch.testing.assert_close(out_fused.ce_loss, out_full.ce_loss)
    for a, b in zip(grads_fused, grads_full, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
