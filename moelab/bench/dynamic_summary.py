"""Paired comparison for `moelab bench dynamic --seeds ...`: each variant against the top-2 baseline at
the same training seed (same data order, same initialisation of the shared parameters).

Why paired: seeds alone move the baseline's val bits/byte by ~0.1 at this budget (1.763-1.895 for three
seeds), far more than the features do, but much of that moves every variant of one seed together. The
difference d_s = bpb(variant, s) - bpb(top2, s) removes it; what is left -- the spread of d_s over
seeds -- is the noise a claim must beat. Reported per variant: every d_s, their mean and sample std,
the paired t statistic mean / (std / sqrt(n)), and `beyond_noise` = |t| above the two-sided 95%
Student-t point for n - 1 degrees of freedom (n = 3: |t| > 4.30, so all three seeds must agree and the
mean must be large against their spread; n = 1 never claims anything).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# two-sided 95% points of Student's t, by degrees of freedom (scipy is not a dependency)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_stats(deltas: list[float]) -> dict:
    n = len(deltas)
    mean = sum(deltas) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (n - 1)) if n > 1 else None
    if sd is None:
        t = None
    elif sd > 0:
        t = mean / (sd / math.sqrt(n))
    else:
        t = math.copysign(math.inf, mean) if mean else 0.0
    crit = T95.get(n - 1, 1.96) if n > 1 else None
    return {
        "mean": mean,
        "sd": sd,
        "min": min(deltas),
        "max": max(deltas),
        "t": t,
        "t_crit": crit,
        "beyond_noise": bool(t is not None and crit is not None and abs(t) > crit),
    }


def _losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in recs if "train/loss" in r and "step" in r}


def identical_until(a: Path, b: Path, before: int) -> float | None:
    """Largest |train loss difference| of two runs over the logged steps before `before` (0.0 = the
    runs are the same run up to there, i.e. the comparison is truly paired)."""
    la, lb = _losses(a), _losses(b)
    common = [s for s in la if s in lb and s < before]
    return max(abs(la[s] - lb[s]) for s in common) if common else None


def _spearman(x: list[float], y: list[float]) -> float | None:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / den if den else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def paired_summary(runs: dict, seeds: list[int], runs_dir: Path, grow_at: int) -> dict:
    """runs[variant][str(seed)] = the bench row -> {variant: paired deltas against top2, ...}."""
    out: dict = {}
    base = runs.get("top2", {})
    keys = [str(s) for s in seeds]
    if all(k in base for k in keys):
        bpb = [base[k]["val_bpb"] for k in keys]
        out["top2"] = {"val_bpb": bpb, "spread": max(bpb) - min(bpb)}
        difficulty = {}  # held-out nats/token per domain of the baseline, averaged over seeds
        for d in base[keys[0]]["loss_by_domain"]:
            difficulty[d] = _mean(base[k]["loss_by_domain"][d] for k in keys)
        out["top2"]["loss_by_domain"] = difficulty
    for name, rows in runs.items():
        if name == "top2" or not all(k in rows for k in keys) or "top2" not in out:
            continue
        deltas = [rows[k]["val_bpb"] - base[k]["val_bpb"] for k in keys]
        st = paired_stats(deltas)
        p = {
            "delta_bpb": deltas,
            **{f"delta_bpb_{k}": v for k, v in st.items() if k not in ("t", "t_crit", "beyond_noise")},
            "t": st["t"],
            "t_crit": st["t_crit"],
            "beyond_noise": st["beyond_noise"],
            "flops_ratio": _mean(rows[k]["train_flops"] / base[k]["train_flops"] for k in keys),
            "delta_mi_over_chance": _mean(rows[k]["mi_over_chance"] - base[k]["mi_over_chance"] for k in keys),
            "delta_output_similarity": _mean(
                rows[k]["expert_output_similarity"] - base[k]["expert_output_similarity"] for k in keys
            ),
            "experts_per_token": _mean(rows[k]["experts_per_token"] for k in keys),
        }
        if name.startswith("grow"):
            p["paired_identical_until"] = [
                identical_until(runs_dir / f"{name}-s{k}", runs_dir / f"top2-s{k}", grow_at) for k in keys
            ]
            p["grow_rel_change"] = [rows[k].get("rel_change") for k in keys]
            p["sibling_output_similarity"] = _mean(rows[k].get("sibling_output_similarity") for k in keys)
            p["sibling_weight_cos2"] = _mean(rows[k].get("sibling_weight_cos2") for k in keys)
        if rows[keys[0]]["experts_per_token"] and any(
            abs(rows[k]["experts_per_token"] - round(rows[k]["experts_per_token"])) > 1e-6 for k in keys
        ):  # adaptive: does a harder domain (baseline loss) get more experts?
            by = {
                d: _mean(rows[k]["experts_per_token_by_domain"].get(d) for k in keys)
                for d in out["top2"]["loss_by_domain"]
            }
            p["experts_per_token_by_domain"] = by
            p["experts_per_token_by_domain_per_seed"] = [rows[k]["experts_per_token_by_domain"] for k in keys]
            doms = [d for d in by if by[d] is not None and out["top2"]["loss_by_domain"][d] is not None]
            diff = out["top2"]["loss_by_domain"]
            p["spearman_k_vs_difficulty"] = _spearman([float(diff[d]) for d in doms], [float(by[d] or 0) for d in doms])
        out[name] = p
    return out
