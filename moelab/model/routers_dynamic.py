"""Dynamic and structured routers (docs/model.md, "Dynamic MoE"): a variable number of experts per
token and two-level routing, all inside the `Routing` contract so every expert backend runs them.

A variable k is a fixed k_max (= `moe.top_k`) with `keep` False and weight 0 on the unused slots:
every backend already skips such slots (no rows, no FLOPs) without a host sync, and capacity,
statistics and analysis already count only kept assignments.

- `TopPRouter` (`router: top_p`): softmax over experts, then the smallest prefix of the sorted
  probabilities whose mass reaches `top_p`, at most top_k slots; weights renormalised over the kept
  slots. Confident tokens use one expert, uncertain ones up to k_max.
- Null experts (`num_null_experts: N`, with softmax_topk or top_p): the gate has E + N rows; a slot
  that picks one of the N null experts outputs zero and costs nothing (AdaMoE, arXiv 2406.13233).
  Its weight share is *not* renormalised away, so a token sure of "nothing" gets a small update.
  Balancing sees the real experts' probabilities renormalised over the real experts (`probs` [T, E]
  sums to 1), so it balances load *among* real experts and is blind to how much mass goes to null
  slots: with the raw (unnormalised) real probabilities, E * sum_i f_i P_i falls as mass moves to the
  null experts, and the balance loss alone drove the mean real k to 0.1-0.2 (null-expert collapse,
  BENCHMARKS.md). How many slots are null is steered by its own loss instead (`null_balance`,
  dynamic_losses.py), from `extra["null_mass"]` [T]: each token's probability on the null experts.
- `HierarchicalRouter` (`router: hierarchical`): a group gate picks `top_groups` of `num_groups`
  groups of consecutive experts; p(expert) = p(group) * p(expert | group), and the top-k of that joint
  inside the chosen groups are the experts. (DeepSeek-V3's group-limited routing is the variant whose
  group score is derived from the expert scores instead of a gate of its own.)
- Multi-task (`num_tasks`): a learned task embedding is added to the router input (`Router.router_input`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.model.router import Router, Routing


class TopPRouter(Router):
    """Top-p routing with optional null experts; with `router: softmax_topk` and null experts it is the
    plain top-k over E + N experts (top_p = 1: every slot is kept unless it is null)."""

    def __init__(self, d_model: int, cfg, use_top_p: bool = True):
        super().__init__(d_model, cfg)
        self.uses_top_p = use_top_p
        self.top_p = cfg.top_p if use_top_p else 1.0  # run-time attribute: inference may override it
        self.num_real = cfg.num_experts
        if cfg.num_null_experts:  # the gate scores the null experts too
            self.weight = nn.Parameter(torch.empty(cfg.num_experts + cfg.num_null_experts, d_model))

    def select(self, x, z):
        p = z.softmax(dim=-1)  # [T, E + N]
        v, ids = p.topk(self.top_k, dim=-1)  # sorted: column 0 is the most probable
        if self.top_p >= 1.0:
            keep = torch.ones_like(ids, dtype=torch.bool)
        else:
            before = v.cumsum(-1) - v  # mass of the better slots: keep slot j while it is still < p
            keep = before < self.top_p  # slot 0 always (before = 0)
        w = self._finish(v * keep)
        real = ids < self.num_real
        keep = keep & real
        ids = torch.where(real, ids, torch.zeros_like(ids))  # a null slot: any valid id, keep False
        extra = {"null_mass": p[:, self.num_real :].sum(-1)} if p.shape[-1] > self.num_real else {}
        return Routing(ids, w * keep, z, self._real_probs(p), keep, extra)

    def _real_probs(self, p):
        """[T, E]: the distribution over the real experts (module docstring: why renormalised)."""
        if p.shape[-1] == self.num_real:
            return p
        real = p[:, : self.num_real]
        return real / real.sum(-1, keepdim=True).clamp_min(1e-20)

    def replay_weights(self, z, ids):  # (replayed routing has no null_mass: no null loss while replaying)
        p = z.softmax(dim=-1)
        return self._finish(p.gather(-1, ids)), self._real_probs(p)


class HierarchicalRouter(Router):
    """Group gate -> top `top_groups` groups -> top-k experts of p(group) p(expert | group) in them."""

    def __init__(self, d_model: int, cfg):
        super().__init__(d_model, cfg)
        self.num_groups, self.top_groups = cfg.num_groups, cfg.top_groups
        self.group_weight = nn.Parameter(torch.empty(cfg.num_groups, d_model))

    def _joint(self, x, z):
        t, e = z.shape
        g = self.num_groups
        gz = F.linear(self.router_input(x), self.group_weight.float())  # [T, G]
        gp = gz.softmax(dim=-1)
        pe = z.view(t, g, e // g).softmax(dim=-1)  # p(expert | group)
        return gp, (gp[:, :, None] * pe).reshape(t, e)  # joint sums to 1 per token

    def select(self, x, z):
        t, e = z.shape
        gp, joint = self._joint(x, z)
        gsel = gp.topk(self.top_groups, dim=-1).indices  # [T, g]
        gmask = torch.zeros_like(gp, dtype=torch.bool).scatter_(1, gsel, True)
        allowed = gmask.repeat_interleave(e // self.num_groups, dim=1)  # [T, E]
        w, ids = joint.masked_fill(~allowed, -1.0).topk(self.top_k, dim=-1)
        return Routing(ids, self._finish(w), z, joint, extra={"group_probs": gp, "group_ids": gsel})

    def replay(self, x, ids):
        z = self.logits(x)
        with torch.autocast(x.device.type, enabled=False):
            gp, joint = self._joint(x, z)
            return Routing(ids, self._finish(joint.gather(-1, ids)), z, joint, extra={"group_probs": gp})


def set_routing_top_p(model, p: float | None) -> None:
    """Inference override of a top-p router's mass (`moelab generate --routing-top-p`); with
    `--num-experts-per-tok` (k_max) it trades quality for speed like a fixed k does."""
    from moelab.errors import UserError

    if p is None:
        return
    if not 0 < p <= 1:
        raise UserError(f"--routing-top-p: expected 0 < P <= 1, got {p}")
    routers = [layer.router for layer in model.moe_layers.values()]
    if not routers or not all(getattr(r, "uses_top_p", False) for r in routers):
        raise UserError("--routing-top-p: the model's router is not top_p (model.moe.router)")
    for r in routers:
        r.top_p = p
