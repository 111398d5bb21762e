"""`cpu_buckets` with low-rank expert deltas: the same sort dispatch and load buckets, each bucket's
base matmul followed by its experts' low-rank products (`kernels/lora.py`), one bmm per bucket each.

Why plain autograd here instead of `cpu_buckets._GroupedSwiGLU`'s hand-written backward: in a LoRA
run the base weights are frozen, so autograd computes only what is needed (activation gradients and
the small A / B gradients) and never the weight-sized base gradients the hand-written backward always
produces. Full fine-tuning without adapters keeps the hand-written path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.kernels.buckets import MatmulCosts, _rows, _weights, plan_buckets
from moelab.kernels.common import with_zero_row
from moelab.kernels.lora import ExpertLoRA, delta_bmm, delta_rows


def lora_grouped_swiglu(
    x_sorted: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    counts: list[int],
    lora: ExpertLoRA,
    row_adapter: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each expert's SwiGLU with its low-rank deltas on its contiguous block of rows (sorted by expert,
    `counts` rows each) -> [N, D]. `row_adapter` [N]: the adapter of each row when serving several."""
    dtype = x_sorted.dtype
    n, f, d = x_sorted.shape[0], down.shape[-1], down.shape[1]
    lora = lora.cast(dtype)
    costs = MatmulCosts.of(dtype, x_sorted.device).in_rows(d, f, x_sorted.element_size())
    buckets = plan_buckets(counts, *costs, device=x_sorted.device)
    x_pad = with_zero_row(x_sorted) if any(b.index is not None for b in buckets) else None
    ad_pad = None
    if row_adapter is not None:
        ad_pad = torch.cat([row_adapter, row_adapter.new_zeros(1)])
    outs, rows = [], []
    for b in buckets:
        e_b, c = len(b.experts), b.rows
        start = b.first_row if b.first_row is not None else 0  # (first_row is set when index is None)
        idx = b.index if b.index is not None else torch.arange(start, start + e_b * c, device=x_sorted.device)
        experts = torch.tensor(b.experts, device=x_sorted.device)
        xb = _rows(x_sorted, x_pad, b)  # [E_b, C, D]
        h = torch.bmm(xb, _weights(gate_up, b, dtype).transpose(1, 2))  # [E_b, C, 2F]
        if ad_pad is None:
            h = h + delta_bmm(xb, lora.gu_a[experts], lora.gu_b[experts], lora)
        else:
            per_row = experts.repeat_interleave(c)
            ad = ad_pad[idx]
            h = h + delta_rows(xb.reshape(e_b * c, -1), lora.gu_a, lora.gu_b, lora, per_row, ad).view_as(h)
        a = F.silu(h[..., :f]) * h[..., f:]  # [E_b, C, F]
        y = torch.bmm(a, _weights(down, b, dtype).transpose(1, 2))  # [E_b, C, D]
        if ad_pad is None:
            y = y + delta_bmm(a, lora.dn_a[experts], lora.dn_b[experts], lora)
        else:
            y = y + delta_rows(a.reshape(e_b * c, -1), lora.dn_a, lora.dn_b, lora, per_row, ad).view_as(y)
        outs.append(y.reshape(e_b * c, d))
        rows.append(idx)
    out = x_sorted.new_zeros(n + 1, d)  # row N: where padding rows of gathered buckets land
    if outs:
        out = out.index_copy(0, torch.cat(rows), torch.cat(outs))
    return out[:n]
