"""A model whose routed experts stay on disk until a token needs them.

`load_offloaded(checkpoint, "lru:64")` builds the `Transformer` on the meta device (no memory),
swaps each MoE layer's `ExpertFFN` for `OffloadedExperts` (same call contract, no parameters),
materialises and loads everything else, and serves expert weights through a `Placement` policy.
Generation code (`moelab.infer.generate`) runs on it unchanged. Inference only: there are no expert
gradients to compute.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moelab.errors import UserError
from moelab.kernels.common import compute_dtype
from moelab.kernels.sort_dispatch import combine, dispatch, plan_dispatch
from moelab.offload.placement import Placement, build_placement
from moelab.offload.store import MmapExpertStore


class OffloadedExperts(nn.Module):
    """`ExpertFFN`'s contract `(x [T, D], topk_ids, weights, keep) -> [T, D] fp32`, weights from a
    Placement: tokens sorted by expert on the host (the placement needs the ids there anyway), then one
    expert at a time."""

    def __init__(self, layer_idx: int, num_experts: int, placement: Placement):
        super().__init__()
        self.layer_idx, self.num_experts, self.placement = layer_idx, num_experts, placement

    def forward(
        self, x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("offloaded experts are for inference: run under torch.no_grad()")
        plan = plan_dispatch(topk_ids, keep, self.num_experts)
        return combine(self._run(dispatch(x, plan, compute_dtype(x)), plan.counts), weights, plan)

    def _run(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        y = x_sorted.new_empty(x_sorted.shape)
        start = 0
        for e, c in enumerate(counts):
            if c:
                gu, dn = self.placement.get(self.layer_idx, e)
                rows = x_sorted[start : start + c]
                h = F.linear(rows, gu.to(rows.dtype))  # [c, 2F]
                f = dn.shape[-1]
                y[start : start + c] = F.linear(F.silu(h[:, :f]) * h[:, f:], dn.to(rows.dtype))
            start += c
        return y


def load_offloaded(
    path: str | Path,
    placement: str = "lru:64",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    remap_bytes: int = 64 << 20,
):
    """(model in eval mode, Config, placement) for a checkpoint or run directory."""
    from moelab.checkpoint import build_model, read_config, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    cfg = read_config(ckpt)
    if cfg.model.moe.expert_backend == "reference":
        raise UserError(
            f"{ckpt}: model.moe.expert_backend 'reference' reads the stacked expert weights; "
            "offloading needs auto, cpu_buckets or grouped_mm"
        )
    store = MmapExpertStore(ckpt / "model.safetensors", remap_bytes)
    ids = cfg.model.moe_layer_ids()
    missing = [i for i in ids if not store.has_layer(i)]
    if missing:
        raise UserError(f"{ckpt / 'model.safetensors'}: no expert weights for MoE layers {missing}")
    policy = build_placement(placement, store, ids, device, dtype)

    def offload_experts(model):
        for i, layer in model.moe_layers.items():
            layer.experts = OffloadedExperts(i, cfg.model.moe.num_experts, policy)

    state = store.read_rest()
    if cfg.model.tie_embeddings:
        state.pop("lm_head.weight", None)
    model = build_model(cfg, state, device, str(ckpt / "model.safetensors"), swap=offload_experts)
    if dtype is not None:
        model.to(dtype)
    return model.eval(), cfg, policy
