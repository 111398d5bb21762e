"""Routed experts: E SwiGLU FFNs held as stacked 3-D weights, and the kernels that run them.

Legend: T tokens, D model width, E experts, K experts per token, F expert width, N = rows sent to
experts (kept token copies, sorted by expert).

Weights use the HF Mixtral layout so interop is a rename: `gate_up` [E, 2F, D] holds gate (rows
0..F-1) then up (rows F..2F-1), `down` [E, D, F]; y = down_e(silu(gate_e x) * up_e x).

Two backends with one signature `(x_sorted [N, D], counts [E] list) -> [N, D]`:
- `grouped_swiglu`: one autograd Function running contiguous per-expert matmuls forward and
  backward. Weight gradients are written straight into one [E, ...] buffer: indexing `w[e]` under
  autograd instead allocates a full-size zero gradient per slice, so cost would grow with E. Under
  autocast the weight slices are cast per expert inside the Function, so only experts that receive
  tokens are ever cast.
- `reference_moe`: the obviously correct mask-and-loop over experts, the test oracle.
`few_tokens_moe` is the decoding path (a handful of tokens, no autograd): it reads the chosen expert
ids once on the host and runs each chosen expert straight from the stacked weights, skipping the
sort, the counts and the grouped Function, whose fixed cost dominates when T is 1..8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a @ b, writing in place when dtypes agree (fp32) and casting once when not (bf16)."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b))


class _GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_up, down, counts: list[int], dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):
            return _GroupedSwiGLU._forward(ctx, x, gate_up, down, counts, dtype)

    @staticmethod
    def _forward(ctx, x, gate_up, down, counts, dtype):
        n, f = x.shape[0], down.shape[-1]
        # Cast each active expert's weights once; backward reuses the casts (autocast's cast cache
        # does the same for nn.Linear). Idle experts are never cast.
        w_gu = [gate_up[e].to(dtype) if c else None for e, c in enumerate(counts)]
        w_dn = [down[e].to(dtype) if c else None for e, c in enumerate(counts)]
        h = x.new_empty(n, 2 * f)  # [N, 2F] gate|up pre-activations
        start = 0
        for e, c in enumerate(counts):
            if c:
                torch.mm(x[start:start + c], w_gu[e].t(), out=h[start:start + c])
            start += c
        g, u = h[:, :f], h[:, f:]
        a = F.silu(g) * u  # [N, F]
        y = x.new_empty(n, down.shape[1])
        start = 0
        for e, c in enumerate(counts):
            if c:
                torch.mm(a[start:start + c], w_dn[e].t(), out=y[start:start + c])
            start += c
        ctx.save_for_backward(x, h, gate_up, down)
        ctx.counts, ctx.dtype, ctx.w_gu, ctx.w_dn = counts, dtype, w_gu, w_dn
        return y

    @staticmethod
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):
            return _GroupedSwiGLU._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, h, gate_up, down = ctx.saved_tensors
        counts, dtype, w_gu, w_dn = ctx.counts, ctx.dtype, ctx.w_gu, ctx.w_dn
        dy = dy.to(dtype).contiguous()
        f = down.shape[-1]
        g, u = h[:, :f], h[:, f:]
        silu_g = F.silu(g)
        a = silu_g * u
        # Weight gradients are fully written by the matmuls below; only idle experts need zeros.
        d_gate_up = torch.empty_like(gate_up)
        d_down = torch.empty_like(down)
        da = torch.empty_like(a)
        start = 0
        for e, c in enumerate(counts):
            if c:
                sl = slice(start, start + c)
                torch.mm(dy[sl], w_dn[e], out=da[sl])
                _mm_into(dy[sl].t(), a[sl], d_down[e])
            else:
                d_gate_up[e].zero_()
                d_down[e].zero_()
            start += c
        # d up = da * silu(g); d gate = silu'(g) * da * u (aten's fused silu_backward). Kept as two
        # contiguous blocks: writing into column halves of one [N, 2F] buffer is slow.
        du = torch.mul(da, silu_g)
        dg = torch.ops.aten.silu_backward(da.mul_(u), g)
        dx = torch.empty_like(x)
        start = 0
        for e, c in enumerate(counts):
            if c:
                sl = slice(start, start + c)
                torch.mm(dg[sl], w_gu[e][:f], out=dx[sl])
                dx[sl].addmm_(du[sl], w_gu[e][f:])
                _mm_into(dg[sl].t(), x[sl], d_gate_up[e, :f])
                _mm_into(du[sl].t(), x[sl], d_gate_up[e, f:])
            start += c
        ctx.w_gu = ctx.w_dn = None
        return dx, d_gate_up, d_down, None, None


def grouped_swiglu(x_sorted: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   counts: list[int]) -> torch.Tensor:
    """Run each expert on its contiguous block of rows; rows must be sorted by expert."""
    return _GroupedSwiGLU.apply(x_sorted, gate_up, down, counts, x_sorted.dtype)


def reference_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """Slow oracle: for each expert, find its tokens with a mask, run the FFN, add weight * output.
    x [T, D], topk_ids/weights [T, K] (dropped assignments carry weight 0). Returns [T, D] fp32."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    f = down.shape[-1]
    for e in range(gate_up.shape[0]):
        hit = topk_ids == e  # [T, K]
        tok = hit.any(dim=-1).nonzero().squeeze(-1)
        if tok.numel() == 0:
            continue
        w_e = (weights * hit).sum(dim=-1)[tok]  # [n]
        h = x[tok] @ gate_up[e].to(x.dtype).t()
        y = (F.silu(h[:, :f]) * h[:, f:]) @ down[e].to(x.dtype).t()
        out = out.index_add(0, tok, y.float() * w_e[:, None])
    return out


def few_tokens_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor,
                   weights: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Decode path: x [T, D] for small T, topk_ids/weights [T, K], keep [T, K] or None. Returns [T, D]
    fp32, equal to `reference_moe` (each token sums its experts in ascending expert order, as the
    sorted dispatch does). One host read of the ids; weights are indexed, never copied."""
    t, k = topk_ids.shape
    f = down.shape[-1]
    ids = topk_ids.tolist()
    kept = keep.tolist() if keep is not None else None
    assignments: dict[int, list[int]] = {}  # expert -> flat indices t * K + j of its assignments
    for ti, row in enumerate(ids):
        for j, e in enumerate(row):
            if kept is None or kept[ti][j]:
                assignments.setdefault(e, []).append(ti * k + j)
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    w_flat = weights.reshape(-1)
    for e in sorted(assignments):
        a = assignments[e]
        if len(a) == 1:  # the common decode case: slices, no index tensors
            tok = a[0] // k
            xe, we = x[tok:tok + 1], w_flat[a[0]:a[0] + 1]
        else:
            idx = torch.tensor(a, device=x.device)
            tok_idx = idx // k
            xe, we = x[tok_idx], w_flat[idx]
        h = F.linear(xe, gate_up[e].to(x.dtype))  # [n, 2F]
        ye = F.linear(F.silu(h[:, :f]) * h[:, f:], down[e].to(x.dtype)).float() * we[:, None]
        if len(a) == 1:
            out[tok:tok + 1] += ye
        else:
            out.index_add_(0, tok_idx, ye)
    return out


class ExpertFFN(nn.Module):
    """E routed SwiGLU experts as stacked parameters."""

    def __init__(self, num_experts: int, d_model: int, expert_dim: int):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * expert_dim, d_model))
        self.down = nn.Parameter(torch.empty(num_experts, d_model, expert_dim))

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return grouped_swiglu(x_sorted, self.gate_up, self.down, counts)
