"""Dispatch and combine: (token, expert) assignments to per-expert row blocks and back.

Legend: T tokens, K experts per token, E experts, D width, A = T*K assignments, N rows of the sorted
block (kept assignments plus alignment padding).

`plan_dispatch` does the integer bookkeeping once per forward (a stable sort by expert, one host
read of the counts). The two differentiable steps are gathers in both directions:
    dispatch  x_sorted[i] = x[src[i]]                  backward  dx[t] = sum_k g[pos[t, k]]
    combine   y[t] = sum_k w[t, k] y_sorted[pos[t, k]]  backward  dy_sorted[i] = w[a] g[a // K], a = inv[i]
Autograd's own backward for `x[src]` is a scatter-add with repeated indices, whose CPU kernel is
serial: it cost more than the expert matmuls' backward on small models here.

Each expert's block may be padded (`block_rows`). Padding rows repeat a real token (finite values),
their outputs are never read and their gradients are exactly zero, so they change no result. Why
pad: CPU bf16 matmuls run on oneDNN, which JIT-builds a kernel for every new shape (counted with
ONEDNN_VERBOSE: creating kernels took longer than running them when row counts changed every step
and every expert; bf16 expert matmuls ran at ~100 GFLOP/s instead of ~800). Rounding row counts up
to a grid of ~40 sizes (`row_grid`: multiples of 32, then steps of 2^(1/4)) keeps the kernels in
oneDNN's cache. fp32 runs on MKL, which has no such cost, so fp32 does not pad.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    counts: list[int]  # [E] rows per expert block of x_sorted (kept + padding), in expert order
    kept: int  # kept assignments (rows that are not padding)
    src: torch.Tensor  # [N] token each row of x_sorted is read from
    pos: torch.Tensor  # [T, K] row of each assignment in x_sorted; N (a zero row) when dropped
    inv: torch.Tensor  # [N] assignment t*K + k each row holds; A (a zero row) for padding rows

    @property
    def rows(self) -> int:
        return self.src.numel()


def _grid(limit: int = 1 << 22) -> list[int]:
    sizes = list(range(32, 257, 32))
    while sizes[-1] < limit:
        sizes.append(32 * math.ceil(sizes[-1] * 2 ** 0.25 / 32))
    return sizes


_GRID = _grid()


def grid_rows(c: int) -> int:
    """The smallest grid size >= c (0 stays 0): at most 1/8 padding up to 256 rows, 19% above."""
    return _GRID[bisect.bisect_left(_GRID, c)] if c else 0


def row_grid(dtype: torch.dtype, device: torch.device) -> Callable[[int], int] | None:
    """How expert blocks are padded for this compute dtype (see the module docstring); None = not."""
    return grid_rows if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else None


def plan_dispatch(topk_ids: torch.Tensor, keep: torch.Tensor | None, num_experts: int,
                  block_rows: Callable[[int], int] | None = None) -> DispatchPlan:
    """topk_ids [T, K]; keep [T, K] bool or None (False = dropped: no row, zero output). Each expert's
    block of c rows is padded to block_rows(c) rows (default: not padded)."""
    t, k = topk_ids.shape
    a = t * k
    flat_e = topk_ids.reshape(-1)
    if keep is not None:
        flat_e = torch.where(keep.reshape(-1), flat_e, num_experts)  # sentinel expert: dropped sort last
    order = torch.argsort(flat_e, stable=True)  # [A] assignments, expert-major
    kept_counts = torch.bincount(flat_e, minlength=num_experts + 1)[:num_experts].tolist()  # the host sync
    kept = sum(kept_counts)
    counts = [block_rows(c) for c in kept_counts] if block_rows else kept_counts
    n = sum(counts)
    dev = topk_ids.device
    if n == kept:  # no padding: sorted position i is row i
        row = torch.arange(a, device=dev)
    else:  # row = padded block start of its expert + rank within the expert
        shifts = [ps - s for ps, s in zip(_starts(counts), _starts(kept_counts), strict=True)]
        shift = torch.tensor(shifts + [0], device=dev)
        row = torch.arange(a, device=dev) + shift[flat_e[order]]
    row[kept:] = n  # dropped assignments read the zero row
    pos = torch.empty_like(row)
    pos[order] = row
    inv = torch.full((n,), a, dtype=torch.long, device=dev)
    inv[row[:kept]] = order[:kept]
    src = (inv // k).clamp_(max=max(t - 1, 0))  # padding rows repeat the last token
    return DispatchPlan(counts, kept, src, pos.view(t, k), inv)


def _starts(counts: list[int]) -> list[int]:
    out, s = [], 0
    for c in counts:
        out.append(s)
        s += c
    return out


def _with_zero_row(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(1, x.shape[1])])


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan: DispatchPlan):
        ctx.plan, ctx.t = plan, x.shape[0]
        return x.index_select(0, plan.src)

    @staticmethod
    def backward(ctx, g):
        plan = ctx.plan
        if plan.kept < plan.pos.numel():  # dropped assignments point at row N
            g = _with_zero_row(g)
        k = plan.pos.shape[1]
        dx = g.index_select(0, plan.pos.reshape(-1)).view(ctx.t, k, g.shape[1])
        return (dx.sum(1) if k > 1 else dx[:, 0]), None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted, weights, plan: DispatchPlan):
        ctx.plan = plan
        ctx.save_for_backward(y_sorted, weights)
        with torch.autocast(y_sorted.device.type, enabled=False):  # the sum stays fp32
            return torch.bmm(weights.unsqueeze(1), _per_token(y_sorted, plan)).squeeze(1)

    @staticmethod
    def backward(ctx, g):
        with torch.autocast(g.device.type, enabled=False):
            return _Combine._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        y_sorted, w = ctx.saved_tensors
        plan = ctx.plan
        t, k = w.shape
        g = g.float()
        dw = torch.bmm(_per_token(y_sorted, plan), g.unsqueeze(-1)).squeeze(-1)  # [T, K]
        contrib = (w.unsqueeze(-1) * g.unsqueeze(1)).view(t * k, -1).to(y_sorted.dtype)  # [A, D]
        if plan.rows > plan.kept:  # padding rows read the zero row A
            contrib = _with_zero_row(contrib)
        return contrib.index_select(0, plan.inv), dw, None


def _per_token(y_sorted: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """[T, K, D] fp32: each assignment's expert output, zeros where dropped."""
    t, k = plan.pos.shape
    if plan.kept < plan.pos.numel():
        y_sorted = _with_zero_row(y_sorted)
    return y_sorted.index_select(0, plan.pos.reshape(-1)).view(t, k, -1).float()


def dispatch(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x [T, D] -> x_sorted [N, D], each expert's rows contiguous in expert order."""
    return _Dispatch.apply(x, plan)


def combine(y_sorted: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """y_sorted [N, D], weights [T, K] fp32 (0 where dropped) -> [T, D] fp32 weighted sum per token."""
    return _Combine.apply(y_sorted, weights, plan)
