"""Low-rank (LoRA) deltas on the routed experts, run by the expert backends next to the base weights.

Legend: E experts, D width, F expert width, r rank, M adapters served at once, N rows sorted by expert.

Layout: one A and one B per expert, stacked like the base weights, so a bucket or a group of rows that
runs one expert's base matmul runs its low-rank product with the same indexing:
    gate_up' = gate_up + s * gu_b @ gu_a     gu_a [E, r, D], gu_b [E, 2F, r]
    down'    = down    + s * dn_b @ dn_a     dn_a [E, r, F], dn_b [E, D, r]
(s = alpha / r). A per-expert A, not one A shared by all experts, because the rows an expert sees are
its own distribution (that is the point of routing): a shared A would project every expert's inputs
onto one r-dimensional subspace. The cost is E * r * (D + F) more parameters, still ~r / F of the
experts' own.

The low-rank product is computed as (x @ A^T) @ B^T on the rows, never as a materialised B @ A: the
weight-sized [E, 2F, D] delta (and its gradient) would cost as much memory as full fine-tuning.

Multi-adapter serving stacks M adapters: gu_a [M, E, r, D] etc. and `token_adapter` [T] says which
adapter each token uses (an all-zero adapter stands for "the base model"). Rows then gather their
own (adapter, expert) pair of A and B; that is inference only (no autograd needed), where N is small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ExpertLoRA:
    """What a backend needs to add the experts' low-rank deltas (see the module docstring)."""

    gu_a: torch.Tensor  # [E, r, D] or [M, E, r, D]
    gu_b: torch.Tensor  # [E, 2F, r] or [M, E, 2F, r]
    dn_a: torch.Tensor  # [E, r, F] or [M, E, r, F]
    dn_b: torch.Tensor  # [E, D, r] or [M, E, D, r]
    scale: float
    dropout: float = 0.0  # on the low-rank path's input, training only
    token_adapter: torch.Tensor | None = None  # [T] long, multi-adapter only

    @property
    def multi(self) -> bool:
        return self.token_adapter is not None

    def cast(self, dtype: torch.dtype) -> ExpertLoRA:
        return ExpertLoRA(
            self.gu_a.to(dtype),
            self.gu_b.to(dtype),
            self.dn_a.to(dtype),
            self.dn_b.to(dtype),
            self.scale,
            self.dropout,
            self.token_adapter,
        )

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, training=True) if self.dropout and torch.is_grad_enabled() else x


def delta_rows(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    lora: ExpertLoRA,
    expert: torch.Tensor,
    adapter: torch.Tensor | None = None,
) -> torch.Tensor:
    """s * B[e] (A[e] x) for rows x [n, D_in] that each name their expert [n] (and adapter [n] when
    serving several). Gathers A and B per row: for small n (decoding, multi-adapter serving)."""
    if adapter is None:
        ar, br = a.index_select(0, expert), b.index_select(0, expert)  # [n, r, D_in], [n, D_out, r]
    else:
        ar, br = a[adapter, expert], b[adapter, expert]
    t = torch.bmm(ar, lora.drop(x).unsqueeze(-1))  # [n, r, 1]
    return torch.bmm(br, t).squeeze(-1) * lora.scale


def delta_bmm(xb: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lora: ExpertLoRA) -> torch.Tensor:
    """s * (xb A^T) B^T for a block of experts: xb [E_b, C, D_in], a [E_b, r, D_in], b [E_b, D_out, r]."""
    return torch.bmm(torch.bmm(lora.drop(xb), a.transpose(1, 2)), b.transpose(1, 2)) * lora.scale


def merged_weights(gate_up: torch.Tensor, down: torch.Tensor, lora: ExpertLoRA) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up + s B A and down + s B A (one bmm each): what merging an adapter writes."""
    return (
        gate_up + lora.scale * torch.bmm(lora.gu_b, lora.gu_a).to(gate_up.dtype),
        down + lora.scale * torch.bmm(lora.dn_b, lora.dn_a).to(down.dtype),
    )
