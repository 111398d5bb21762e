"""The CPU decode path: a handful of tokens, no autograd.

It reads the chosen expert ids once on the host and runs each chosen expert straight from the stacked
weights, skipping the sort, the counts and the grouped Function, whose fixed cost dominates when T is
1..8 on a CPU. It is also registered as the operator `torch.ops.moelab.few_tokens_moe`, which a
compiled decode step calls as one opaque node (torch.compile cannot trace the host read of the ids).
On a GPU the host read would stall the stream every layer; the `grouped_mm` backend decodes instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def few_tokens_moe(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    topk_ids: torch.Tensor,
    weights: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, D] for small T, topk_ids/weights [T, K], keep [T, K] or None. Returns [T, D] fp32, equal
    to `reference_moe` (each token sums its experts in ascending expert order, as the sorted dispatch
    does). One host read of the ids; weights are indexed, never copied."""
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
            xe, we = x[tok : tok + 1], w_flat[a[0] : a[0] + 1]
        else:
            idx = torch.tensor(a, device=x.device)
            tok_idx = idx // k
            xe, we = x[tok_idx], w_flat[idx]
        h = F.linear(xe, gate_up[e].to(x.dtype))  # [n, 2F]
        ye = F.linear(F.silu(h[:, :f]) * h[:, f:], down[e].to(x.dtype)).float() * we[:, None]
        if len(a) == 1:
            out[tok : tok + 1] += ye
        else:
            out.index_add_(0, tok_idx, ye)
    return out


_OPS = torch.library.Library("moelab", "FRAGMENT")
_OPS.define(
    "few_tokens_moe(Tensor x, Tensor gate_up, Tensor down, Tensor topk_ids, Tensor weights, Tensor? keep) -> Tensor"
)
_OPS.impl("few_tokens_moe", few_tokens_moe, "CompositeExplicitAutograd")
torch.library.register_fake("moelab::few_tokens_moe", lib=_OPS)(
    lambda x, gate_up, down, topk_ids, weights, keep: x.new_empty(x.shape, dtype=torch.float32)
)
