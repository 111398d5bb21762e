"""AdamW with explicit parameter groups, and the learning-rate schedule.

Groups (decided by parameter name, not by ndim, because the two easy mistakes are ndim rules):
- `decay`: every matmul weight — attention q/k/v/o, dense and shared-expert gate/up/down, the LM head,
  and the stacked routed-expert weights `experts.gate_up` [E, 2F, D] / `experts.down` [E, D, F]. An
  `ndim == 2` rule silently leaves these 3-D tensors undecayed.
- `router`: router gates `router.weight` [E, D], the noisy router's `router.noise_weight` and the
  shared-expert gate. No decay: they are 2-D, so an `ndim >= 2` rule would decay them, and shrinking the
  gate pulls every token towards uniform routing; their scale is what the z-loss controls instead.
- `no_decay`: the token embedding (and with it a tied LM head), RMSNorm weights, biases.
Every trainable parameter lands in exactly one group (asserted).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moelab.config import TrainConfig

GROUPS = ("decay", "no_decay", "router")


def param_group(name: str, p: torch.Tensor) -> str:
    """Which optimizer group a parameter belongs to (see the module docstring)."""
    if ".router." in name or name.endswith("shared_gate.weight"):
        return "router"
    if name == "embed.weight" or name.endswith(("norm.weight", ".bias")):
        return "no_decay"
    return "decay" if p.ndim >= 2 else "no_decay"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{"name", "params", "param_names", "weight_decay"}] for torch.optim; tied tensors appear once."""
    named: dict[str, list] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():  # tied weights are yielded once, under the first name
        if p.requires_grad:
            named[param_group(name, p)].append((name, p))
    groups = [
        {
            "name": g,
            "params": [p for _, p in items],
            "param_names": [n for n, _ in items],
            "weight_decay": weight_decay if g == "decay" else 0.0,
        }
        for g, items in named.items()
        if items
    ]
    in_groups = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(in_groups) == len(set(in_groups)) and set(in_groups) == trainable, (
        "every trainable parameter must be in exactly one optimizer group"
    )
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`. On CPU and CUDA the fused kernel is used (one pass over each tensor),
    with the multi-tensor `foreach` path elsewhere (sharded DTensor parameters); both give the same
    result up to rounding."""
    device = next(model.parameters()).device
    kw = {"fused": True} if device.type in ("cpu", "cuda") and _plain_tensors(model) else {}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kw
    )


def _plain_tensors(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return not any(isinstance(p, DTensor) for p in model.parameters())


def lr_at(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr / (warmup + 1) to lr over
    `warmup_steps`, then `schedule` from lr down to min_lr at the last step (constant stays at lr). With
    `budget_seconds` the decay runs over time as well: progress is the larger of the step's share of
    train.steps and `elapsed_s` (seconds of training so far) over the budget, matching the run's stop at
    whichever comes first, so a run on a slow or busy machine still ends its schedule when its time ends."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.budget_seconds is not None:
        progress = max(progress, min(1.0, elapsed_s / cfg.budget_seconds))
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, router_lr_scale: float = 1.0) -> None:
    """Every group at `lr`, the router group at lr x `router_lr_scale` (`train.router_lr_scale`). The scale
    is passed in, not stored in the group: a resumed run's config decides it, not the checkpoint's."""
    for group in optimizer.param_groups:
        group["lr"] = lr * router_lr_scale if group.get("name") == "router" else lr
