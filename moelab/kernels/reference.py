"""The obviously correct MoE: for each expert, find its tokens with a mask, run the FFN, add
weight * output. The oracle every fast backend is tested against; slow (one pass per expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.kernels.lora import ExpertLoRA, delta_rows


def reference_moe(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    topk_ids: torch.Tensor,
    weights: torch.Tensor,
    lora: ExpertLoRA | None = None,
) -> torch.Tensor:
    """x [T, D], gate_up [E, 2F, D], down [E, D, F], topk_ids/weights [T, K] (dropped assignments carry
    weight 0), optional low-rank deltas (`kernels/lora.py`). Returns [T, D] fp32."""
    if lora is not None:
        lora = lora.cast(x.dtype)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    f = down.shape[-1]
    for e in range(gate_up.shape[0]):
        hit = topk_ids == e  # [T, K]
        tok = hit.any(dim=-1).nonzero().squeeze(-1)
        if tok.numel() == 0:
            continue
        w_e = (weights * hit).sum(dim=-1)[tok]  # [n]
        xe = x[tok]
        h = xe @ gate_up[e].to(x.dtype).t()
        if lora is not None:
            h = h + _delta(xe, lora.gu_a, lora.gu_b, lora, e, tok)
        a = F.silu(h[:, :f]) * h[:, f:]
        y = a @ down[e].to(x.dtype).t()
        if lora is not None:
            y = y + _delta(a, lora.dn_a, lora.dn_b, lora, e, tok)
        out = out.index_add(0, tok, y.float() * w_e[:, None])
    return out


def _delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lora: ExpertLoRA, e: int, tok: torch.Tensor):
    """s * (x A_e^T) B_e^T, the plain LoRA formula (per row's adapter when serving several)."""
    if lora.token_adapter is not None:  # several adapters (`lora.multi`)
        ad = lora.token_adapter[tok]
        return delta_rows(x, a, b, lora, torch.full_like(ad, e), ad)
    return (lora.drop(x) @ a[e].t()) @ b[e].t() * lora.scale


class ReferenceBackend:
    """`moe.expert_backend: reference`. No sorted-rows entry point: it never sorts."""

    name = "reference"

    def moe(self, x, gate_up, down, topk_ids, weights, keep=None, lora=None):
        return reference_moe(x, gate_up, down, topk_ids, weights, lora)
