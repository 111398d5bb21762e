"""Paired comparison for `moelab bench dynamic --seeds ...`: each variant against the top-2 baseline at
the same training seed (same data order, same initialisation of the shared parameters).

Why paired: seeds alone move the baseline's val bits/byte by ~0.1 at this budget (1.763-1.895 for three
seeds), far more than the features do, but much of that moves every variant of one seed together. The
difference d_s = bpb(variant, s) - bpb(top2, s) removes it; what is left -- the spread of d_s over
seeds -- is the noise a claim must beat. Reported per variant: every d_s, their mean and sample std,
the paired t statistic mean / (std / sqrt(n)), and `beyond_noise` = |t| above the two-sided 95%
Student-t point for n - 1 degrees of freedom (n = 3: |t| > 4.30, so all three seeds must agree and the
mean must be large against their spread; n = 1 never claims anything).

Adaptive k by domain: "harder" is declared before looking, as where more active experts *pay*: the
per-domain held-out loss of the fixed top-1 run minus that of the fixed top-4 run at the same seed,
averaged over seeds (`gain_by_domain`; needs the top1 and top4 variants). Raw loss (`loss_by_domain`)
is kept for comparison, but it mostly measures irreducible entropy (random digits), which no number of
experts lowers. The direction counts as met when Spearman(mean k by domain, gain) reaches its one-sided
5% point (0.9 for the bench's 5 domains) and every seed's own k ordering correlates positively with
the gain.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# one-sided 5% points of Spearman's rho by number of domains: the smallest r with P(rho >= r) <= 0.05
# under the exact permutation distribution (enumerated; 5 domains: 0.9, i.e. at most one adjacent swap)
SPEARMAN_CRIT = {4: 1.0, 5: 0.9, 6: 0.8286, 7: 0.7143, 8: 0.6429}

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
        if all(k in runs.get("top1", {}) and k in runs.get("top4", {}) for k in keys):
            per_seed = [
                {d: runs["top1"][k]["loss_by_domain"][d] - runs["top4"][k]["loss_by_domain"][d] for d in difficulty}
                for k in keys
            ]
            out["top2"]["gain_by_domain_per_seed"] = per_seed
            out["top2"]["gain_by_domain"] = {d: _mean(g[d] for g in per_seed) for d in difficulty}
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
        ):  # adaptive: do domains where more experts pay get more experts?
            by = {
                d: _mean(rows[k]["experts_per_token_by_domain"].get(d) for k in keys)
                for d in out["top2"]["loss_by_domain"]
            }
            p["experts_per_token_by_domain"] = by
            p["experts_per_token_by_domain_per_seed"] = [rows[k]["experts_per_token_by_domain"] for k in keys]
            p["spearman_k_vs_loss"] = _rho(out["top2"]["loss_by_domain"], by)
            if "gain_by_domain" in out["top2"]:
                p.update(_direction(out["top2"]["gain_by_domain"], by, p["experts_per_token_by_domain_per_seed"]))
        out[name] = p
    return out


def _rho(x: dict, y: dict) -> float | None:
    doms = [d for d in x if x[d] is not None and y.get(d) is not None]
    return _spearman([float(x[d]) for d in doms], [float(y[d]) for d in doms])


def _direction(gain: dict, k_mean: dict, k_per_seed: list[dict]) -> dict:
    """Does an adaptive router give more experts where more experts pay (module docstring)? Also each
    domain's k minus the seed's mean k over domains, mean and sd over seeds: a domain effect is only
    real if it is large against its own spread over seeds (the overall k moves a lot by seed)."""
    per_seed = [_rho(gain, k) for k in k_per_seed]
    pooled = _rho(gain, k_mean)
    crit = SPEARMAN_CRIT.get(len(gain))  # fewer than 4 or more than 8 domains: no claim is made
    effect = {}
    for d in gain:
        dev = [k[d] - _mean(k.values()) for k in k_per_seed if k.get(d) is not None]
        st = paired_stats(dev) if dev else None
        effect[d] = {"mean": st["mean"], "sd": st["sd"]} if st else None
    return {
        "spearman_k_vs_gain": pooled,
        "spearman_k_vs_gain_per_seed": per_seed,
        "k_domain_effect": effect,
        "spearman_crit": crit,
        "direction_met": bool(
            pooled is not None
            and crit is not None
            and pooled >= crit - 1e-9
            and all(r is not None and r > 0 for r in per_seed)
        ),
    }
