"""Aux losses that need more than one layer's routing: group balance (hierarchical router), per-task
balance (multi-task routing), the share of null slots (null experts) and expert diversity. Same
contract as `losses.AUX_LOSSES` -- unweighted, per layer, averaged over layers, coefficient
`moe.<name>_coef` scaled by the aux schedule -- but a layer computes one only when its coefficient is
> 0 (diversity reads every expert weight) and, for null_balance, the model has null experts, so runs
without them log exactly what they logged before.

Diversity form (why weights, not outputs): the mean squared cosine similarity between experts'
flattened weights (gate_up and down together). It is 0 for mutually orthogonal experts and 1 for
identical ones (its maximum), needs no extra expert forward passes (the output form runs every expert
on every token: E/k times the routed FLOPs), and it acts exactly where similarity comes from in this
toolkit: experts created as copies (upcycling, `moelab grow`). BENCHMARKS.md ("bench dynamic") reports
what it does to the output similarity `expert_output_similarity` measures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.model.losses import switch_load_balance


def expert_diversity(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """gate_up [E, 2F, D], down [E, D, F] -> mean over pairs i != j of cos(w_i, w_j)^2 (fp32)."""
    e = gate_up.shape[0]
    if e < 2:
        return gate_up.new_zeros((), dtype=torch.float32)
    w = torch.cat([gate_up.reshape(e, -1), down.reshape(e, -1)], dim=1).float()
    w = F.normalize(w, dim=1)
    c = (w @ w.t()).square()
    return (c.sum() - c.diagonal().sum()) / (e * (e - 1))


def group_balance(group_probs: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor | None = None):
    """Switch balance over groups: G * sum_g f_g P_g (1.0 balanced, G / g when every token picks the same g)."""
    return switch_load_balance(group_probs, group_ids, None, mask)


def task_balance(
    probs: torch.Tensor,
    topk_ids: torch.Tensor,
    keep,
    task_ids: torch.Tensor,
    num_tasks: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch balance computed within each task's tokens, averaged over the tasks present: no task may
    pile onto a few experts even when the mix as a whole looks balanced."""
    tasks = task_ids.reshape(-1)
    real = torch.ones_like(tasks, dtype=torch.float32) if mask is None else mask.reshape(-1).float()
    terms = []
    for t in range(num_tasks):
        m = real * (tasks == t)
        terms.append((switch_load_balance(probs, topk_ids, keep, m), (m.sum() > 0).float()))
    num = torch.stack([v * present for v, present in terms]).sum()
    return num / torch.stack([present for _, present in terms]).sum().clamp_min(1.0)


def null_balance(
    null_mass: torch.Tensor,
    keep: torch.Tensor,
    k_max: int,
    target_share: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keeps the share of a token's k_max slots that use no real expert near `target_share`.

    null_mass [T]: each token's router probability on the null experts; keep [T, K]: the kept real
    slots (K = k_max). share = 1 - mean_t k_t / k_max is a count (no gradient), so the loss is
    (share - target)^2 in value with a straight-through gradient through the mean null mass:
    d loss / d mean(null_mass) = 2 (share - target). Too many null slots lower the null experts'
    probabilities, too few raise them; 0 exactly at the target. In [0, 1]."""
    w = torch.ones(keep.shape[0], device=keep.device) if mask is None else mask.reshape(-1).float()
    n = w.sum().clamp_min(1.0)
    share = 1.0 - (keep.float().sum(-1) * w).sum() / n / k_max
    pn = (null_mass.float() * w).sum() / n
    return (share.detach() + pn - pn.detach() - target_share).square()


def _null(layer, r, mask):
    from moelab.model.dynamic_config import null_k_target

    mass = r.extra.get("null_mass")
    if mass is None or r.keep is None:  # replayed routing: no router decision to steer
        return torch.zeros((), device=r.logits.device)
    cfg = layer.cfg  # the target is a share of moe.top_k, so it holds while a schedule changes the live k
    return null_balance(mass, r.keep, r.topk_ids.shape[-1], 1.0 - null_k_target(cfg) / cfg.top_k, mask)


def _diversity(layer, r, mask):
    ex = layer.experts
    if not hasattr(ex, "gate_up"):  # swapped experts (expert parallel, offload): nothing to compare here
        return torch.zeros((), device=r.logits.device)
    return expert_diversity(ex.gate_up, ex.down)


def _group(layer, r, mask):
    return group_balance(r.extra["group_probs"], r.extra["group_ids"], mask)


def _task(layer, r, mask):
    tasks = getattr(layer.router, "task_ids", None)
    if tasks is None:
        return torch.zeros((), device=r.logits.device)
    return task_balance(r.probs, r.topk_ids, r.keep, tasks, layer.cfg.num_tasks, mask)


# name -> (fn(layer, routing, mask), MoEConfig coefficient attribute)
EXTRA_AUX_LOSSES = {
    "diversity": (_diversity, "diversity_coef"),
    "group_balance": (_group, "group_balance_coef"),
    "task_balance": (_task, "task_balance_coef"),
    "null_balance": (_null, "null_balance_coef"),
}
# a loss whose coefficient is on by default exists only where the model has what it steers
_NEEDS = {"null_balance": lambda cfg: cfg.num_null_experts > 0}


def enabled_extra(moe_cfg) -> list[str]:
    """The extra aux losses `moe_cfg` turns on (coefficient > 0 and, where it matters, the feature)."""
    return [
        name
        for name, (_, attr) in EXTRA_AUX_LOSSES.items()
        if getattr(moe_cfg, attr) > 0 and _NEEDS.get(name, lambda c: True)(moe_cfg)
    ]


def extra_aux_losses(layer, r, mask) -> dict[str, torch.Tensor]:
    return {name: EXTRA_AUX_LOSSES[name][0](layer, r, mask) for name in enabled_extra(layer.cfg)}


def coef_attr(name: str) -> str:
    from moelab.model.losses import AUX_LOSSES

    return (AUX_LOSSES.get(name) or EXTRA_AUX_LOSSES[name])[1]


def total_loss(ce_loss: torch.Tensor, aux_losses: dict[str, torch.Tensor], coefs: dict[str, float]) -> torch.Tensor:
    """ce + sum_name coefs[name] * aux_losses[name]: the one place the training loss is assembled (the
    model with its config's coefficients, the trainer with the scheduled ones, through the same call)."""
    total = ce_loss
    for name, value in aux_losses.items():
        coef = coefs.get(name, 0.0)
        if coef:
            total = total + coef * value
    return total


def config_coefs(moe_cfg, names) -> dict[str, float]:
    """The `*_coef` values of `moe_cfg` for the aux losses `names` (unscheduled)."""
    return {name: getattr(moe_cfg, coef_attr(name)) for name in names}


@torch.no_grad()
def expert_output_similarity(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> float:
    """Mean over expert pairs i != j of |cos(y_i(x), y_j(x))|, averaged over the tokens x [T, D]: every
    expert runs on every token (a measurement, not a training loss)."""
    f = down.shape[-1]
    h = torch.einsum("td,efd->etf", x.float(), gate_up.float())
    y = torch.einsum("etf,edf->etd", F.silu(h[..., :f]) * h[..., f:], down.float())  # [E, T, D]
    y = F.normalize(y, dim=-1)
    e = y.shape[0]
    c = torch.einsum("itd,jtd->ijt", y, y).abs().mean(-1)
    return float((c.sum() - c.diagonal().sum()) / max(1, e * (e - 1)))
