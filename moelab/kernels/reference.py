"""The obviously correct MoE: for each expert, find its tokens with a mask, run the FFN, add
weight * output. The oracle every fast backend is tested against; slow (one pass per expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """x [T, D], gate_up [E, 2F, D], down [E, D, F], topk_ids/weights [T, K] (dropped assignments carry
    weight 0). Returns [T, D] fp32."""
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


class ReferenceBackend:
    """`moe.expert_backend: reference`. No sorted-rows entry point: it never sorts."""

    name = "reference"

    def moe(self, x, gate_up, down, topk_ids, weights, keep=None):
        return reference_moe(x, gate_up, down, topk_ids, weights)
