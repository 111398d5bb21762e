"""Transformer building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Conventions follow HF Llama/Mixtral so weights move across with a rename: RMSNorm normalises in fp32
and casts back before the weight; RoPE uses the rotate-half (split halves) layout.
Legend: B batch, S sequence, D model width, H heads, G kv heads, Dh head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.kernels.common import compute_dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the same arithmetic in one aten call (the residual stream is fp32)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, Dh] in fp32 for positions 0..seq_len-1 (halves layout: cat(freqs, freqs))."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [B, H, S, Dh]; cos/sin broadcastable to [B or 1, 1, S, Dh]. rot(x) = [-x2, x1]. Computed in
    fp32, returned in `dtype` (default x's)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(dtype or x.dtype)


def attention_dtype(dtype: torch.dtype, device: torch.device, head_dim: int) -> torch.dtype:
    """CPU's flash-attention kernel ran slower in bf16 than in fp32 below head width 64 here (1.8x
    at 32, forward + backward; about even at 64, bf16 ahead at 64 x seq 512), so there q, k, v are
    cast up; everything else stays in the autocast dtype."""
    return torch.float32 if device.type == "cpu" and dtype == torch.bfloat16 and head_dim < 64 else dtype


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE on PyTorch's scaled_dot_product_attention.

    `cache` (optional) is any object with `update(layer_idx, k, v) -> (k_all, v_all)`; with it,
    `attn_mask` [B, 1, S, S_all] (bool, True = attend) must describe which cached positions each
    query may see. Without a cache the mask defaults to plain causal."""

    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, qkv_bias: bool = False, layer_idx: int = 0
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, D] -> q [B, H, S, Dh], k and v [B, G, S, Dh], before RoPE."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        b, s, _ = x.shape
        x = x.to(compute_dtype(x))  # cast once for q, k and v (autocast would cast per projection)
        q, k, v = self.project(x)
        dt = attention_dtype(q.dtype, q.device, self.head_dim)
        q, k, v = apply_rope(q, cos, sin, dt), apply_rope(k, cos, sin, dt), v.to(dt)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
            k, v = k.to(dt), v.to(dt)
        gqa = self.n_heads != self.n_kv_heads
        with torch.autocast(q.device.type, enabled=False):  # the dtype is chosen above; autocast would recast
            if attn_mask is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, enable_gqa=gqa)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        # back to the projections' dtype: a bf16 model (no autocast) may have run attention in fp32 above
        return self.o_proj(y.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim).to(x.dtype))


class HeadQKNormAttention(Attention):
    """Qwen3-style qk-norm: RMSNorm over each head's query and key (one [Dh] weight shared by all
    heads), before RoPE. Bounds attention logits, which keeps large-lr training stable."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        layer_idx: int = 0,
        eps: float = 1e-5,
    ):
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, qkv_bias, layer_idx)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def project(self, x):
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v


class FullQKNormAttention(Attention):
    """OLMoE-style qk-norm: RMSNorm over the whole query projection [H*Dh] and key projection [G*Dh],
    before the split into heads and before RoPE."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        layer_idx: int = 0,
        eps: float = 1e-5,
    ):
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, qkv_bias, layer_idx)
        self.q_norm = RMSNorm(n_heads * head_dim, eps)
        self.k_norm = RMSNorm(n_kv_heads * head_dim, eps)

    def project(self, x):
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_norm(self.k_proj(x)).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v


def build_attention(cfg, layer_idx: int) -> Attention:
    """The attention class named by `cfg.qk_norm` (a `ModelConfig`)."""
    args = (cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hdim, cfg.qkv_bias, layer_idx)
    if cfg.qk_norm == "head":
        return HeadQKNormAttention(*args, eps=cfg.norm_eps)
    if cfg.qk_norm == "full":
        return FullQKNormAttention(*args, eps=cfg.norm_eps)
    return Attention(*args)


class SwiGLU(nn.Module):
    """Dense feed-forward down(silu(gate x) * up x); also the shared expert of an MoE layer."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
