"""The MoE feed-forward: router -> dispatch -> experts -> combine, plus shared experts.

Legend: B batch, S sequence, T = B*S tokens, D model width, E experts, K experts per token,
N rows sent to the experts (kept (token, expert) assignments, plus padding; see dispatch.py).

Dispatch (`dispatch.py`) sorts the T*K assignments by expert (a stable argsort), gathers the token
rows into one [N, D] block with each expert's rows contiguous, runs the experts (`experts.py`), and
combines by weighting each token's K expert outputs in fp32 and summing them. Cost is O(T*K*D) for
the permutation plus the active expert FLOPs, independent of E.

Two seams let scale-out code change a built layer without touching this file (`moelab.parallel`,
`moelab.offload`): `experts` may be any module honouring `ExpertFFN`'s contract
`(x_sorted [N, D], counts [E]) -> [N, D]` (expert parallelism and offloaded experts swap it), and
`batch` decides which tokens the balance statistics describe (data parallelism sums over ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from moelab.config import MoEConfig
from moelab.model.dispatch import combine, dispatch, plan_dispatch, row_grid
from moelab.model.experts import ExpertFFN, few_tokens_moe, reference_moe
from moelab.model.layers import SwiGLU, compute_dtype
from moelab.model.losses import AUX_LOSSES, expert_counts, router_entropy
from moelab.model.router import Routing, build_router

# Up to this many tokens without autograd (decoding), experts run straight from their stacked weights:
# the sort dispatch's fixed cost is most of a decode step's MoE time there.
FEW_TOKENS = 8


@dataclass
class RoutingStats:
    """What one MoE layer did in one forward. Tensors are detached except `aux_losses`."""

    tokens_per_expert: torch.Tensor  # [E] kept assignments per expert (real tokens only)
    dropped: torch.Tensor  # scalar: assignments dropped by capacity
    assignments: torch.Tensor  # scalar: assignments routed (kept + dropped)
    entropy: torch.Tensor  # scalar: mean router entropy (nats)
    topk_ids: torch.Tensor  # [T, K]
    keep: torch.Tensor | None  # [T, K] kept assignments, None when all are kept
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, with grad

    @property
    def dropped_fraction(self) -> float:
        return float(self.dropped) / max(1.0, float(self.assignments))


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Slots per expert: ceil(cf * T * K / E) (GShard/Switch; Megatron's `get_capacity`)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_keep(topk_ids: torch.Tensor, priority: torch.Tensor, num_experts: int, capacity: int,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """Keep at most `capacity` assignments per expert, highest `priority` first (earlier token on
    ties). Returns keep [T, K] bool. Dropped assignments leave their token on the residual path."""
    flat_e = topk_ids.reshape(-1)
    if keep is not None:
        flat_e = torch.where(keep.reshape(-1), flat_e, num_experts)  # sentinel expert sorts last
    by_priority = torch.argsort(-priority.reshape(-1), stable=True)
    order = by_priority[torch.argsort(flat_e[by_priority], stable=True)]  # expert-major, best first
    counts = torch.bincount(flat_e, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    sorted_e = flat_e[order]
    rank = torch.arange(order.numel(), device=order.device) - starts[sorted_e]
    kept_sorted = (rank < capacity) & (sorted_e < num_experts)
    out = torch.empty_like(kept_sorted)
    out[order] = kept_sorted
    return out.view_as(topk_ids)


class LocalBatch:
    """Balance statistics describe this process's tokens. Data-parallel training swaps in one that sums
    the expert counts over every rank, so f_i and the logged loads are the global batch's."""

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        return counts


class MoELayer(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = build_router(d_model, cfg)
        self.experts = ExpertFFN(cfg.num_experts, d_model, cfg.expert_dim)
        self.batch = LocalBatch()
        # Generation turns this off: a decode step never reads RoutingStats or aux losses, which cost
        # dozens of small ops per layer; forward then returns None in their place.
        self.record_stats = True
        self.shared = None
        self.shared_gate = None
        if cfg.num_shared_experts:
            width = (cfg.shared_expert_dim or cfg.expert_dim) * cfg.num_shared_experts
            self.shared = SwiGLU(d_model, width)
            if cfg.shared_expert_gate:
                self.shared_gate = nn.Linear(d_model, 1, bias=False)

    def capacity(self, num_tokens: int) -> int | None:
        cf = self.cfg.capacity_factor
        if not self.training and self.cfg.eval_capacity_factor is not None:
            cf = self.cfg.eval_capacity_factor
        if cf is None or self.cfg.router == "expert_choice":  # expert choice has capacity built in
            return None
        return expert_capacity(cf, num_tokens, self.router.top_k, self.cfg.num_experts)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RoutingStats | None]:
        """x [B, S, D], mask [B, S] (1 = real token) -> (y [B, S, D], RoutingStats or None when
        `record_stats` is off)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        tmask = mask.reshape(-1) if mask is not None else None
        r: Routing = self.router(x)
        keep = r.keep
        cap = self.capacity(x.shape[0])
        if cap is not None:
            keep = capacity_keep(r.topk_ids, r.topk_weights, self.cfg.num_experts, cap, keep)
        if tmask is not None:  # padding tokens take no expert slot
            real = tmask.bool()[:, None].expand_as(r.topk_ids)
            keep = real if keep is None else keep & real
        weights = r.topk_weights if keep is None else r.topk_weights * keep

        if self.cfg.expert_impl == "reference":
            y = reference_moe(x, self.experts.gate_up, self.experts.down, r.topk_ids, weights)
        elif self._few_tokens(x.shape[0]):
            # A compiled decode step runs it as one opaque operator, at any batch size: the sort
            # dispatch reads expert counts on the host, which would break the graph.
            run = torch.ops.moelab.few_tokens_moe if torch.compiler.is_compiling() else few_tokens_moe
            y = run(x, self.experts.gate_up, self.experts.down, r.topk_ids, weights, keep)
        else:
            y = self._dispatch_combine(x, r.topk_ids, weights, keep)
        if self.shared is not None:
            s = self.shared(x).float()
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x).float()) * s
            y = y + s
        stats = self._stats(r, keep, tmask) if self.record_stats else None
        return y.to(x.dtype).view(shape), stats

    def _few_tokens(self, num_tokens: int) -> bool:
        # (a swapped-in expert module -- expert parallel, offload -- keeps the sort dispatch contract)
        return not torch.is_grad_enabled() and type(self.experts) is ExpertFFN and (
            torch.compiler.is_compiling() or num_tokens <= FEW_TOKENS)  # (no size guard when compiling)

    def _dispatch_combine(self, x, topk_ids, weights, keep) -> torch.Tensor:
        dtype = compute_dtype(x)
        plan = plan_dispatch(topk_ids, keep, self.cfg.num_experts, row_grid(dtype, x.device))
        y = self.experts(dispatch(x.to(dtype), plan), plan.counts)  # [N, D]
        return combine(y, weights, plan)  # [T, D] fp32

    def _stats(self, r: Routing, keep, tmask) -> RoutingStats:
        with torch.no_grad():
            routed = expert_counts(r.topk_ids, self.cfg.num_experts, r.keep, tmask)
            kept = expert_counts(r.topk_ids, self.cfg.num_experts, keep, tmask) if keep is not None else routed
            routed, kept = self.batch.sum_counts(torch.stack([routed, kept]))  # [2, E]: one reduction
        aux = {name: fn(r, tmask, routed) for name, (fn, _) in AUX_LOSSES.items()}
        with torch.no_grad():
            return RoutingStats(
                tokens_per_expert=kept,
                dropped=routed.sum() - kept.sum(),
                assignments=routed.sum(),
                entropy=router_entropy(r.probs, tmask),
                topk_ids=r.topk_ids.detach(),
                keep=keep,
                aux_losses=aux,
            )
