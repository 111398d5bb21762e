"""Host-planned sort dispatch: (token, expert) assignments to per-expert row blocks and back.

Legend: T tokens, K experts per token, E experts, D width, A = T*K assignments, N rows of the sorted
block (kept assignments plus alignment padding).

`plan_dispatch` does the integer bookkeeping once per forward (a stable sort by expert, one host
read of the counts). The differentiable steps are gathers in both directions:
    dispatch  x_sorted[i] = x[src[i]]                  backward  dx[t] = sum_k g[pos[t, k]]
    combine   y[t] = sum_k w[t, k] y_sorted[pos[t, k]]  backward  dy_sorted[i] = w[a] g[a // K], a = inv[i]
    sum_rows  y[t] = sum_k y_sorted[pos[t, k]]          backward  dy_sorted[i] = g[a // K]
`sum_rows` is the combine of a kernel that applied the routing weights itself, between its two matmuls
(`row_weights` gives them in row order): the [T, K, D] weighted products and their backward go away.
Autograd's own backward for `x[src]` is a scatter-add with repeated indices, whose CPU kernel is
serial: it cost more than the expert matmuls' backward on small models here.

Each expert's block may be padded (`block_rows`, a policy of the kernel that runs the experts, e.g.
`cpu_buckets.row_grid`). Padding rows repeat a real token (finite values), their outputs are never
read and their gradients are exactly zero, so they change no result.

The counts are read on the host: the CPU kernels and expert parallelism's all-to-all splits need
them as Python ints. The `grouped_mm` backend plans on the device instead (`grouped_mm.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moelab.kernels.common import with_zero_row


@dataclass
class DispatchPlan:
    counts: list[int]  # [E] rows of each expert's block of x_sorted (kept + padding), by expert id
    kept: int  # kept assignments (rows that are not padding)
    src: torch.Tensor  # [N] token each row of x_sorted is read from
    pos: torch.Tensor  # [T, K] row of each assignment in x_sorted; N (a zero row) when dropped
    inv: torch.Tensor  # [N] assignment t*K + k each row holds; A (a zero row) for padding rows
    layout: list | None = None  # what `layout` returned: the blocks are in its order, not by expert id

    @property
    def rows(self) -> int:
        return self.src.numel()


def plan_dispatch(
    topk_ids: torch.Tensor,
    keep: torch.Tensor | None,
    num_experts: int,
    block_rows: Callable[[int], int] | None = None,
    layout: Callable[[list[int]], list] | None = None,
) -> DispatchPlan:
    """topk_ids [T, K]; keep [T, K] bool or None (False = dropped: no row, zero output). Each expert's
    block of c rows is padded to block_rows(c) rows (default: not padded), blocks in expert order.
    `layout(kept counts by expert)` instead returns groups in the order x_sorted should hold them,
    each with `experts` and `rows` (every active expert once; its block padded to the group's rows),
    e.g. `buckets.plan_layout`'s buckets."""
    t, k = topk_ids.shape
    a = t * k
    flat_e = topk_ids.reshape(-1)
    if keep is not None:
        flat_e = torch.where(keep.reshape(-1), flat_e, num_experts)  # sentinel expert: dropped sort last
    dev = topk_ids.device
    kept_counts = torch.bincount(flat_e, minlength=num_experts + 1)[:num_experts].tolist()  # the host sync
    groups = None
    if layout is None:
        key = flat_e
        order = torch.argsort(key, stable=True)  # [A] assignments, expert-major
        counts = [block_rows(c) for c in kept_counts] if block_rows else kept_counts
        kept_seq, rows_seq = kept_counts, counts
    else:
        groups = layout(kept_counts)
        counts = [0] * num_experts
        seq = []
        for g in groups:
            for e in g.experts:
                counts[e] = g.rows
                seq.append(e)
        seq += [e for e in range(num_experts) if not kept_counts[e]]  # idle experts: empty blocks, last
        rank = torch.empty(num_experts + 1, dtype=torch.long)
        rank[torch.tensor(seq + [num_experts])] = torch.arange(num_experts + 1)
        key = rank.to(dev)[flat_e]  # the position of each assignment's expert in the layout
        order = torch.argsort(key, stable=True)
        kept_seq, rows_seq = [kept_counts[e] for e in seq], [counts[e] for e in seq]
    kept = sum(kept_counts)
    n = sum(counts)
    if n == kept:  # no padding: sorted position i is row i
        row = torch.arange(a, device=dev)
    else:  # row = padded block start of its expert + rank within the expert
        shifts = [ps - s for ps, s in zip(_starts(rows_seq), _starts(kept_seq), strict=True)]
        shift = torch.tensor(shifts + [0], device=dev)
        row = torch.arange(a, device=dev) + shift[key[order]]
    row[kept:] = n  # dropped assignments read the zero row
    pos = torch.empty_like(row)
    pos[order] = row
    inv = torch.full((n,), a, dtype=torch.long, device=dev)
    inv[row[:kept]] = order[:kept]
    src = (inv // k).clamp_(max=max(t - 1, 0))  # padding rows repeat the last token
    return DispatchPlan(counts, kept, src, pos.view(t, k), inv, groups)


def _starts(counts: list[int]) -> list[int]:
    out, s = [], 0
    for c in counts:
        out.append(s)
        s += c
    return out


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan: DispatchPlan, dtype: torch.dtype):
        ctx.plan, ctx.x_dtype = plan, x.dtype
        return x.to(dtype).index_select(0, plan.src)

    @staticmethod
    def backward(ctx, g):
        plan = ctx.plan
        return _sum_token_rows(g, plan, ctx.x_dtype), None, None


def _sum_token_rows(
    rows: torch.Tensor, plan: DispatchPlan, dtype: torch.dtype, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """rows [N, D] -> [T, D] in `dtype`: each token's K rows summed, each times its weight when `weights`
    [T, K] are given (0 for dropped assignments), exactly in the wider of the two dtypes (bf16 rows into an
    fp32 sum: cast first), as one `embedding_bag` (each token's [K] row of `pos` one bag). The result is a
    tensor of its own, as FSDP2's output hooks need. K row gathers added in place took 12x as long at K = 8
    in fp32 (2.5 vs 0.21 ms for 2048 tokens, D 128) and 1.1-1.7x in bf16 (K 2-8) with the cast; a [T, K, D]
    gather summed over its middle dim 7x as long, and with weights a [1, K] x [K, D] bmm per token 3-10x."""
    if plan.kept < plan.pos.numel():  # dropped assignments point at row N
        rows = with_zero_row(rows)
    wide = torch.promote_types(rows.dtype, dtype)
    per_sample = None if weights is None else weights.to(wide)
    return F.embedding_bag(plan.pos, rows.to(wide), per_sample_weights=per_sample, mode="sum").to(dtype)


def _token_grad_rows(g: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """g [T, D] -> [N, D]: each sorted row's token gradient (zeros on padding rows, which read row T)."""
    t, k = plan.pos.shape
    token = torch.where(plan.inv < t * k, plan.inv // k, t)
    return with_zero_row(g).index_select(0, token)


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted, weights, plan: DispatchPlan):
        ctx.plan, ctx.y_dtype = plan, y_sorted.dtype
        ctx.save_for_backward(y_sorted, weights)  # in its own dtype: half a [T, K, D] fp32 copy's bytes in bf16
        with torch.autocast(y_sorted.device.type, enabled=False):  # the sum stays fp32
            return _sum_token_rows(y_sorted, plan, torch.float32, weights)

    @staticmethod
    def backward(ctx, g):
        with torch.autocast(g.device.type, enabled=False):
            return _Combine._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        y_sorted, w = ctx.saved_tensors
        plan = ctx.plan
        t, k = w.shape
        g_rows = _token_grad_rows(g.float(), plan)  # [N, D]
        d_y = d_w = None
        if ctx.needs_input_grad[0]:
            d_y = (g_rows * row_weights(w.float(), plan)[:, None]).to(ctx.y_dtype)
        if ctx.needs_input_grad[1]:
            per_row = (y_sorted.float() * g_rows).sum(-1)  # [N]: <y_sorted[i], g[token(i)]>
            d_w = with_zero_row(per_row[:, None])[:, 0].index_select(0, plan.pos.reshape(-1)).view(t, k)
        return d_y, d_w, None


class _SumRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted, plan: DispatchPlan):
        ctx.plan, ctx.y_dtype = plan, y_sorted.dtype
        return _sum_token_rows(y_sorted, plan, torch.float32)

    @staticmethod
    def backward(ctx, g):
        return _token_grad_rows(g.to(ctx.y_dtype), ctx.plan), None


def row_weights(weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """weights [T, K] -> [N]: each row's routing weight, 0 on padding rows (differentiable)."""
    flat = weights.reshape(-1)
    return torch.cat([flat, flat.new_zeros(1)]).index_select(0, plan.inv)


def sum_rows(y_sorted: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """y_sorted [N, D] already scaled by the routing weights -> [T, D] fp32: each token's K rows summed
    (0 for dropped assignments; padding rows are never read)."""
    return _SumRows.apply(y_sorted, plan)


def dispatch(x: torch.Tensor, plan: DispatchPlan, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [T, D] -> x_sorted [N, D] in `dtype` (default x's), each expert's rows contiguous in expert
    order. The gradient comes back in x's dtype."""
    return _Dispatch.apply(x, plan, dtype or x.dtype)


def combine(y_sorted: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """y_sorted [N, D], weights [T, K] fp32 (0 where dropped) -> [T, D] fp32 weighted sum per token."""
    return _Combine.apply(y_sorted, weights, plan)
