"""Routed experts: E SwiGLU FFNs held as stacked 3-D weights, run by an expert backend.

Weights use the HF Mixtral layout so interop is a rename: `gate_up` [E, 2F, D] holds gate (rows
0..F-1) then up (rows F..2F-1), `down` [E, D, F]; y = down_e(silu(gate_e x) * up_e x).

How the experts run (sorting tokens by expert, the matmuls, the weighted sum back per token) is the
backend's business (`moelab.kernels`), chosen when the layer is built from `moe.expert_backend`.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.kernels import backend_name, build_expert_backend, fused_grouped_mm


class ExpertFFN(nn.Module):
    """E routed SwiGLU experts as stacked parameters."""

    def __init__(self, num_experts: int, d_model: int, expert_dim: int, backend: str = "auto"):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * expert_dim, d_model))
        self.down = nn.Parameter(torch.empty(num_experts, d_model, expert_dim))
        self.backend = build_expert_backend(backend, d_model, expert_dim)
        self.lora = None  # fine-tuning: a module whose `deltas()` gives the backend low-rank deltas (moelab.finetune)

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    def forward(
        self, x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [T, D], topk_ids/weights [T, K] (weights 0 where dropped), keep [T, K] or None -> [T, D] fp32."""
        if self.lora is not None:
            return self.backend.moe(x, self.gate_up, self.down, topk_ids, weights, keep, lora=self.lora.deltas(x))
        return self.backend.moe(x, self.gate_up, self.down, topk_ids, weights, keep)


def sync_free_experts(experts: nn.Module, device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether a layer's experts module runs with static shapes and no host sync on `device` in `dtype`:
    an `ExpertFFN` whose backend resolves to `grouped_mm` there, on a GPU where torch's grouped matmul
    is its fused kernel (elsewhere torch loops over the groups after reading their sizes on the host).
    Only then can a compiled graph take the layer whole, or a CUDA graph capture it (a host read during
    capture is an error). Swapped-in modules (offload, expert parallelism) plan on the host."""
    if not isinstance(experts, ExpertFFN) or backend_name(experts.backend, device, dtype) != "grouped_mm":
        return False
    return torch.device(device).type != "cuda" or fused_grouped_mm(device)
