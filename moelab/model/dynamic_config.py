"""Validation of the dynamic / structured MoE settings of `MoEConfig` (kept out of config.py so the
shared file only gains one call). One line per problem, like every other config check."""

from __future__ import annotations

NULL_ROUTERS = ("softmax_topk", "top_p")  # routers whose softmax can include zero experts


def adaptive(cfg) -> bool:
    """Whether the number of real experts per token varies (FLOPs then follow the measured mean k)."""
    return cfg.router == "top_p" or cfg.num_null_experts > 0


def null_k_target(cfg) -> float:
    """The intended mean real experts per token with null experts: `null_k_target`, or the midpoint of
    [1, top_k] (top_k 3 -> 2: the FLOPs of a top-2 model, with room to spend 1 to 3 per token)."""
    return cfg.null_k_target if cfg.null_k_target is not None else (1 + cfg.top_k) / 2


def validate_dynamic(cfg, prefix: str = "moe") -> list[str]:
    p: list[str] = []
    if not 0 < cfg.top_p <= 1:
        p.append(f"{prefix}.top_p: expected 0 < top_p <= 1, got {cfg.top_p}")
    if cfg.num_null_experts < 0:
        p.append(f"{prefix}.num_null_experts: expected >= 0, got {cfg.num_null_experts}")
    elif cfg.num_null_experts and cfg.router not in NULL_ROUTERS:
        p.append(f"{prefix}.num_null_experts: null experts need router softmax_topk or top_p, router is {cfg.router!r}")
    elif cfg.num_null_experts and cfg.top_k > cfg.num_experts + cfg.num_null_experts:
        p.append(f"{prefix}.top_k: {cfg.top_k} is larger than num_experts + num_null_experts")
    if cfg.num_groups < 1:
        p.append(f"{prefix}.num_groups: expected >= 1, got {cfg.num_groups}")
    elif cfg.num_experts % cfg.num_groups:
        p.append(f"{prefix}.num_groups: {cfg.num_groups} does not divide num_experts={cfg.num_experts}")
    elif not 1 <= cfg.top_groups <= cfg.num_groups:
        p.append(f"{prefix}.top_groups: expected between 1 and num_groups={cfg.num_groups}, got {cfg.top_groups}")
    elif cfg.router == "hierarchical" and cfg.top_k > cfg.top_groups * (cfg.num_experts // cfg.num_groups):
        p.append(
            f"{prefix}.top_k: {cfg.top_k} is more than the {cfg.top_groups} chosen groups hold "
            f"({cfg.top_groups} x {cfg.num_experts // cfg.num_groups} experts)"
        )
    if cfg.router != "hierarchical" and cfg.num_groups != 1:
        p.append(f"{prefix}.num_groups: expert groups need router hierarchical, router is {cfg.router!r}")
    if cfg.num_tasks < 0:
        p.append(f"{prefix}.num_tasks: expected >= 0, got {cfg.num_tasks}")
    if cfg.null_k_target is not None:
        if not cfg.num_null_experts:
            p.append(f"{prefix}.null_k_target: a target for real experts per token needs num_null_experts > 0")
        elif not 0 < cfg.null_k_target <= cfg.top_k:
            p.append(
                f"{prefix}.null_k_target: expected 0 < null_k_target <= top_k={cfg.top_k}, got {cfg.null_k_target}"
            )
    for name in ("group_balance_coef", "task_balance_coef", "diversity_coef", "null_balance_coef"):
        if getattr(cfg, name) < 0:
            p.append(f"{prefix}.{name}: expected >= 0, got {getattr(cfg, name)}")
    if cfg.group_balance_coef and cfg.router != "hierarchical":
        p.append(f"{prefix}.group_balance_coef: group balancing needs router hierarchical, router is {cfg.router!r}")
    if cfg.task_balance_coef and not cfg.num_tasks:
        p.append(f"{prefix}.task_balance_coef: per-task balancing needs num_tasks > 0")
    return p
