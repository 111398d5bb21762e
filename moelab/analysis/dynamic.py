"""Analysis of dynamic and structured routing (docs/model.md, "Dynamic MoE"): experts per token (mean,
distribution, by domain: do harder inputs get more experts?), group specialisation for hierarchical
routers (I(domain; group) against its shuffled chance level) and experts per task for multi-task runs."""

from __future__ import annotations

import torch

from moelab.analysis import stats


def experts_per_token(keep: torch.Tensor | None, n: int, k: int) -> torch.Tensor:
    """[N] kept experts of each traced token."""
    return keep.sum(-1).double() if keep is not None else torch.full((n,), float(k), dtype=torch.float64)


def layer_stats(lt, trace) -> dict:
    """Extra per-layer fields for analysis.json."""
    n, k = lt.topk_ids.shape
    per_tok = experts_per_token(lt.keep, n, k)
    out: dict = {
        "experts_per_token": float(per_tok.mean()) if n else 0.0,
        "k_dist": (torch.bincount(per_tok.long(), minlength=k + 1).double() / max(1, n)).tolist(),
    }
    dom, m = trace.domain_ids, len(trace.domain_names)
    if dom is not None and m:
        tot = torch.zeros(m, dtype=torch.float64).index_add_(0, dom.long(), per_tok)
        cnt = torch.bincount(dom.long(), minlength=m).double().clamp_min(1)
        out["experts_per_token_by_domain"] = (tot / cnt).tolist()
    g = getattr(trace, "num_groups", 1)
    if g > 1 and dom is not None and m:
        groups = lt.topk_ids // (trace.num_experts // g)
        joint = stats.domain_expert_counts(groups, dom, m, g, lt.keep)
        out["group_distribution"] = stats.row_distribution(joint).tolist()
        out["group_mutual_information"] = stats.mutual_information(joint)
        out["group_mi_chance"] = stats.shuffled_mutual_information(groups, dom, m, g, lt.keep)
    tasks = getattr(trace, "task_ids", None)
    if tasks is not None:
        t = int(tasks.max()) + 1
        joint = stats.domain_expert_counts(lt.topk_ids, tasks, t, trace.num_experts, lt.keep)
        out["task_distribution"] = stats.row_distribution(joint).tolist()
        out["task_mutual_information"] = stats.mutual_information(joint)
    return out


def format_lines(analysis: dict) -> list[str]:
    """Terminal lines: experts per token per layer (and by domain when it varies)."""
    lines = []
    names = [d["name"] for d in analysis.get("domains", [])]
    for lay in analysis["layers"]:
        if "experts_per_token" not in lay or (
            lay["experts_per_token"] == analysis["top_k"] and "group_mutual_information" not in lay
        ):
            continue
        row = f"  layer {lay['layer']}: {lay['experts_per_token']:.2f} experts/token"
        by = lay.get("experts_per_token_by_domain")
        if by and names:
            row += " (" + ", ".join(f"{n} {v:.2f}" for n, v in zip(names, by, strict=False)) + ")"
        if "group_mutual_information" in lay:
            row += f"; I(src;group) {lay['group_mutual_information']:.4f} (chance {lay['group_mi_chance']:.4f})"
        lines.append(row)
    return lines
