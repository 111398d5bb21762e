"""Routing schedules as pure functions of the optimizer step, and their application to a model.

- Gumbel temperature: tau anneals from `moe.gumbel_tau` to `schedule.gumbel_tau_end` (exponential by
  default, tau_t = tau_0 * (tau_end / tau_0) ** progress, the usual Gumbel-softmax annealing). A hot
  router explores experts early; a cold one commits to its choices.
- Aux coefficient: every `moe.*_coef` is multiplied by a factor going linearly from
  `schedule.aux_coef_start` to 1 over `aux_coef_steps` (e.g. strong balancing early, then relax).
- Top-k (dense-to-sparse): experts per token go linearly from `schedule.top_k_start` (e.g. all of
  them) down to `moe.top_k` at `top_k_steps`, so every expert gets gradient early on.
- Aux-loss-free bias (sigmoid router with `router_bias`): after each optimizer step each layer's
  selection bias moves by `moe.bias_update_rate` towards the mean load (arXiv 2408.15664).
Being functions of the step alone, they need no state in a checkpoint: a resumed run recomputes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moelab.config import Config
from moelab.model.losses import AUX_LOSSES


def _progress(step: int, steps: int) -> float:
    return 1.0 if steps <= 0 else min(1.0, step / steps)


def gumbel_tau(step: int, cfg: Config) -> float:
    start, end = cfg.model.moe.gumbel_tau, cfg.schedule.gumbel_tau_end
    if end is None:
        return start
    steps = cfg.schedule.gumbel_tau_steps if cfg.schedule.gumbel_tau_steps is not None else cfg.train.steps
    t = _progress(step, steps)
    shape = cfg.schedule.gumbel_tau_shape
    if shape == "exponential":
        return start * (end / start) ** t
    if shape == "linear":
        return start + (end - start) * t
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def aux_coef_scale(step: int, cfg: Config) -> float:
    s = cfg.schedule
    return s.aux_coef_start + (1.0 - s.aux_coef_start) * _progress(step, s.aux_coef_steps)


def aux_coefs(step: int, cfg: Config) -> dict[str, float]:
    """Scheduled coefficient of every aux loss (name -> coef), from the moe config's `*_coef` values."""
    scale = aux_coef_scale(step, cfg)
    from moelab.model.dynamic_losses import EXTRA_AUX_LOSSES, enabled_extra

    moe = cfg.model.moe  # the extra losses exist (and have a coefficient) only when turned on
    both = {**AUX_LOSSES, **{n: EXTRA_AUX_LOSSES[n] for n in enabled_extra(moe)}}
    return {name: scale * getattr(moe, attr) for name, (_, attr) in both.items()}


def top_k(step: int, cfg: Config) -> int:
    k_end, k_start = cfg.model.moe.top_k, cfg.schedule.top_k_start
    if k_start is None:
        return k_end
    steps = cfg.schedule.top_k_steps if cfg.schedule.top_k_steps is not None else cfg.train.steps // 2
    return math.floor(k_start + (k_end - k_start) * _progress(step, steps) + 0.5)  # round half up


@dataclass
class RoutingSchedule:
    """The scheduled values for one step."""

    tau: float
    top_k: int
    coefs: dict[str, float]


def at_step(step: int, cfg: Config) -> RoutingSchedule:
    return RoutingSchedule(gumbel_tau(step, cfg), top_k(step, cfg), aux_coefs(step, cfg))


def apply(model, sched: RoutingSchedule, cfg: Config) -> None:
    """Set the routers' run-time attributes for this step (only the ones a schedule drives)."""
    if cfg.schedule.gumbel_tau_end is not None:
        model.set_router_attr("tau", sched.tau)
    if cfg.schedule.top_k_start is not None:
        model.set_router_attr("top_k", sched.top_k)


def uses_bias_update(cfg: Config) -> bool:
    moe = cfg.model.moe
    return bool(cfg.model.moe_layer_ids()) and moe.router == "sigmoid" and moe.router_bias and moe.bias_update_rate > 0


@torch.no_grad()
def update_router_bias(model, tokens_per_expert: dict[int, torch.Tensor], rate: float) -> None:
    """Aux-loss-free balancing: after an optimizer step, nudge each layer's selection bias towards the
    mean load, using the expert counts of that step (all micro-batches). The bias is part of the router:
    where fine-tuning freezes the router (`finetune.mode` experts, non-router LoRA), it stays put too,
    or routing would drift under a "frozen" router."""
    for i, layer in model.moe_layers.items():
        if not any(p.requires_grad for p in layer.router.parameters()):
            continue
        if i in tokens_per_expert and hasattr(layer.router, "update_bias"):
            layer.router.update_bias(tokens_per_expert[i], rate)
