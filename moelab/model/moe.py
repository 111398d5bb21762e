"""The MoE feed-forward: router -> dispatch -> experts -> combine, plus shared experts.

Legend: B batch, S sequence, T = B*S tokens, D model width, E experts, K experts per token,
N rows sent to the experts (kept (token, expert) assignments, plus padding; see dispatch.py).

The router picks K experts per token; capacity (if any) and padding tokens turn some assignments
off; the experts (`experts.py`) return each token's routing-weighted sum of its experts' outputs in
fp32. How they do it -- sorting the T*K assignments by expert, grouped matmuls, gathering back -- is
an expert backend chosen when the layer is built (`moe.expert_backend`, see `moelab.kernels`).

Two seams let scale-out code change a built layer without touching this file (`moelab.parallel`,
`moelab.offload`): `experts` may be any module honouring `ExpertFFN`'s contract
`(x [T, D], topk_ids [T, K], weights [T, K], keep) -> [T, D] fp32` (expert parallelism and offloaded
experts swap it), and `batch` decides which tokens the balance statistics describe (data parallelism
sums over ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from moelab.config import MoEConfig
from moelab.model.dynamic_losses import extra_aux_losses
from moelab.model.experts import ExpertFFN
from moelab.model.layers import SwiGLU
from moelab.model.losses import AUX_LOSSES, expert_counts, router_entropy
from moelab.model.router import Routing
from moelab.model.router_registry import build_router


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
    experts_per_token: torch.Tensor | None = None  # [K + 1] real tokens using 0..K kept experts

    @property
    def dropped_fraction(self) -> float:
        return float(self.dropped) / max(1.0, float(self.assignments))


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Slots per expert: ceil(cf * T * K / E) (GShard/Switch; Megatron's `get_capacity`)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_keep(
    topk_ids: torch.Tensor, priority: torch.Tensor, num_experts: int, capacity: int, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep at most `capacity` assignments per expert, highest `priority` first (earlier token on
    ties). Returns keep [T, K] bool. Dropped assignments leave their token on the residual path."""
    flat_e = topk_ids.reshape(-1)
    if keep is not None:
        flat_e = torch.where(keep.reshape(-1), flat_e, num_experts)  # sentinel expert sorts last
    by_priority = torch.argsort(-priority.reshape(-1), stable=True)
    order = by_priority[torch.argsort(flat_e[by_priority], stable=True)]  # expert-major, best first
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat_e.device)
    counts.scatter_add_(0, flat_e, torch.ones_like(flat_e))  # (bincount reads its max on the host)
    starts = torch.cumsum(counts, 0) - counts
    sorted_e = flat_e[order]
    rank = torch.arange(order.numel(), device=order.device) - starts[sorted_e]
    kept_sorted = (rank < capacity) & (sorted_e < num_experts)
    return torch.empty_like(kept_sorted).scatter_(0, order, kept_sorted).view_as(topk_ids)


@dataclass
class RoutingRecord:
    """The routing one MoE layer used in its last forward, kept when `MoELayer.record_routing` is on
    (generation records rollouts with it; RL compares training against them). Ids are encoded for
    replay: an assignment dropped by capacity (or not picked by an expert-choice expert) is stored as
    -1 - expert, so replaying it drops the same assignment and still knows the expert for the weight
    rule. `natural`: what the router itself would pick (equal to `ids` unless the routing was forced)."""

    ids: torch.Tensor  # [T, K] int64, encoded as above
    weights: torch.Tensor  # [T, K] fp32 gate weights used (0 where dropped)
    natural: torch.Tensor  # [T, K] int64, encoded


def encode_ids(ids: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return ids if keep is None else torch.where(keep, ids, -1 - ids)


def decode_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encoded ids -> (expert ids >= 0, keep mask or None when nothing is dropped)."""
    dropped = ids < 0
    if not bool(dropped.any()):
        return ids, None
    return torch.where(dropped, -1 - ids, ids), ~dropped


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
        self.experts = ExpertFFN(cfg.num_experts, d_model, cfg.expert_dim, cfg.expert_backend)
        self.batch = LocalBatch()
        # Generation turns this off: a decode step never reads RoutingStats or aux losses, which cost
        # dozens of small ops per layer; forward then returns None in their place.
        self.record_stats = True
        self.record_routing = False  # keep a RoutingRecord of each forward in `self.recorded`
        self.recorded: RoutingRecord | None = None
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

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        forced: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, RoutingStats | None]:
        """x [B, S, D], mask [B, S] (1 = real token) -> (y [B, S, D], RoutingStats or None when
        `record_stats` is off). `forced` = (ids [B, S, K] encoded as in RoutingRecord, weights [B, S, K]
        or None) replays a routing: no top-k selection and no capacity (drops are in the ids); weights
        None = the router's rule at those ids (trainable), else these fixed weights."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        tmask = mask.reshape(-1) if mask is not None else None
        natural = None
        if forced is None:
            r: Routing = self.router(x)
            keep = r.keep
            cap = self.capacity(x.shape[0])
            if cap is not None:
                keep = capacity_keep(r.topk_ids, r.topk_weights, self.cfg.num_experts, cap, keep)
        else:
            ids, keep = decode_ids(forced[0].reshape(-1, forced[0].shape[-1]))
            r = self.router.replay(x, ids)
            if forced[1] is not None:
                r.topk_weights = forced[1].reshape(ids.shape).detach().float()
            if self.record_routing:
                with torch.no_grad():
                    own = self.router.select(x, r.logits.detach())
                    natural = encode_ids(own.topk_ids, own.keep)
        dropless = keep is None  # every real token keeps its K experts (padding aside)
        if tmask is not None:  # padding tokens take no expert slot
            real = tmask.bool()[:, None].expand_as(r.topk_ids)
            keep = real if keep is None else keep & real
        weights = r.topk_weights if keep is None else r.topk_weights * keep
        if self.record_routing:
            used = encode_ids(r.topk_ids, keep).detach()
            self.recorded = RoutingRecord(used, weights.detach(), used if natural is None else natural)

        y = self.experts(x, r.topk_ids, weights, keep)  # [T, D] fp32
        if self.shared is not None:
            s = self.shared(x).float()
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x).float()) * s
            y = y + s
        stats = self._stats(r, keep, tmask, dropless) if self.record_stats else None
        return y.to(x.dtype).view(shape), stats

    def _stats(self, r: Routing, keep, tmask, dropless: bool = False) -> RoutingStats:
        with torch.no_grad():
            routed = expert_counts(r.topk_ids, self.cfg.num_experts, r.keep, tmask)
            kept = expert_counts(r.topk_ids, self.cfg.num_experts, keep, tmask) if keep is not None else routed
            routed, kept = self.batch.sum_counts(torch.stack([routed, kept]))  # [2, E]: one reduction
        # only the losses training weighs: one with coefficient 0 (cv and variance by default) would add a
        # dozen small ops forward and backward per layer and step for a number nobody uses (the hard load
        # CV is logged from the counts anyway); schedules only scale coefficients, so 0 stays 0
        aux = {name: fn(r, tmask, routed) for name, (fn, coef) in AUX_LOSSES.items() if getattr(self.cfg, coef)}
        aux.update(extra_aux_losses(self, r, tmask))  # likewise only those whose coefficient is > 0
        with torch.no_grad():
            return RoutingStats(
                tokens_per_expert=kept,
                dropped=routed.sum() - kept.sum(),
                assignments=routed.sum(),
                entropy=router_entropy(r.probs, tmask),
                topk_ids=r.topk_ids.detach(),
                keep=keep,
                aux_losses=aux,
                experts_per_token=experts_per_token_hist(r.topk_ids, None if dropless else keep, tmask),
            )


def experts_per_token_hist(topk_ids: torch.Tensor, keep: torch.Tensor | None, tmask) -> torch.Tensor:
    """[K + 1] fp32: how many real tokens used 0, 1, ..., K kept experts (adaptive routers, null experts
    and capacity drops make it vary; fixed top-k without drops is all at K)."""
    t, k = topk_ids.shape
    if keep is None:  # fixed top-k, nothing dropped: every real token at K, no [T, K + 1] comparison needed
        real = (
            torch.full((1,), float(t), device=topk_ids.device) if tmask is None else tmask.reshape(1, -1).float().sum(1)
        )
        return torch.cat([real.new_zeros(k), real])
    n = keep.sum(-1)
    w = torch.ones(t, device=topk_ids.device) if tmask is None else tmask.reshape(-1).float()
    # a [T, K + 1] comparison summed, not a scatter into K + 1 bins: deterministic, and inductor's CPU
    # code generator failed on that tiny atomic scatter inside a compiled layer
    one_hot = n.long()[:, None] == torch.arange(k + 1, device=topk_ids.device)
    return (one_hot.float() * w[:, None]).sum(0)
