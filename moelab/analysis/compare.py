"""Comparing runs: validation bits per byte at equal tokens, FLOPs and wall time (dense vs MoE).

"At equal X" is read off each run's val/bpb curve by linear interpolation at the largest X every run
reached, so a run that trained longer gets no credit for it. FLOPs are the trainer's analytic count
(`moelab.model.counting`, 6 x active parameters per token plus attention), so a sparse model is charged
only for the experts it runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moelab.analysis import plots, runlog
from moelab.analysis.report import CSS, Figures, _e, _fmt, _table, read_run_config
from moelab.errors import UserError
from moelab.fileio import write_file_atomic

AXES = (("tokens", "tokens"), ("flops", "FLOPs"), ("elapsed_s", "time (s)"))


def _names(run_dirs: list[Path]) -> list[str]:
    """Short distinct labels: the directory name, or more of the path when names collide."""
    parts = [p.resolve().parts for p in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in run_dirs]


def load_runs(run_dirs: list[str | Path]) -> list[dict]:
    """[{name, dir, records, config}] with every run checked to have val/bpb records."""
    if len(run_dirs) < 1:
        raise UserError("compare: give at least one run directory")
    dirs = [Path(d) for d in run_dirs]
    seen: dict[Path, Path] = {}
    for d in dirs:
        if d.resolve() in seen:
            raise UserError(f"{d}: given twice (as {seen[d.resolve()]} and {d}); compare distinct runs")
        seen[d.resolve()] = d
    runs = []
    for d, name in zip(dirs, _names(dirs), strict=False):
        if not d.is_dir():
            raise UserError(f"{d}: no such run directory")
        records = runlog.read_metrics(d)
        if not runlog.series(records, "val/bpb")[0]:
            raise UserError(
                f"{d / 'metrics.jsonl'}: no val/bpb records to compare (validation runs every "
                "eval.every steps and at the end of training)"
            )
        runs.append({"name": name, "dir": d, "records": records, "config": read_run_config(d)})
    return runs


def value_at(records: list[dict], x_key: str, x: float) -> float | None:
    """val/bpb at `x` by linear interpolation between val points (None outside the measured range)."""
    xs, ys = runlog.series(records, "val/bpb", x=x_key)
    if not xs or x < xs[0] - 1e-9 or x > xs[-1] + 1e-9:
        return None
    order = np.argsort(xs, kind="stable")
    return float(np.interp(x, np.asarray(xs)[order], np.asarray(ys)[order]))


def comparison(runs: list[dict]) -> dict:
    """Rows (one per run) and the common budgets: {"budgets": {x: value}, "rows": [...]}."""
    budgets = {}
    for key, _ in AXES:
        reach = [max(runlog.series(r["records"], "val/bpb", x=key)[0], default=None) for r in runs]
        budgets[key] = min(reach) if all(v is not None for v in reach) else None
    rows = []
    for r in runs:
        recs, cfg = r["records"], r["config"]
        row = {
            "run": r["name"],
            "dir": str(r["dir"]),
            "step": recs[-1]["step"],
            "tokens": runlog.last_value(recs, "tokens"),
            "flops": runlog.last_value(recs, "flops"),
            "elapsed_s": runlog.last_value(recs, "elapsed_s"),
            "final_bpb": runlog.last_value(recs, "val/bpb"),
            "best_bpb": runlog.best_value(recs, "val/bpb"),
        }
        if cfg is not None:
            from moelab.model.counting import count_params

            p = count_params(cfg.model)
            moe = cfg.model.moe
            row["model"] = f"MoE {moe.num_experts}x top-{moe.top_k}" if cfg.model.moe_layer_ids() else "dense"
            row["params_total"], row["params_active"] = p.total, p.active
        for key, _ in AXES:
            b = budgets[key]
            row[f"bpb_at_equal_{key}"] = value_at(recs, key, b) if b is not None else None
        rows.append(row)
    return {"budgets": budgets, "rows": rows}


def format_table(comp: dict) -> str:
    b = comp["budgets"]
    head = [
        "run",
        "model",
        "active/total params",
        "tokens",
        "FLOPs",
        "time s",
        "final bpb",
        "best bpb",
        f"bpb @{_fmt(b['tokens'])} tok",
        f"bpb @{_fmt(b['flops'])} FLOPs",
        f"bpb @{_fmt(b['elapsed_s'], 3)} s",
    ]
    rows = [
        [
            r["run"],
            r.get("model", "?"),
            f"{_fmt(r.get('params_active'))}/{_fmt(r.get('params_total'))}" if "params_total" in r else "?",
            _fmt(r["tokens"]),
            _fmt(r["flops"]),
            _fmt(r["elapsed_s"], 3),
            _fmt(r["final_bpb"]),
            _fmt(r["best_bpb"]),
            _fmt(r["bpb_at_equal_tokens"]),
            _fmt(r["bpb_at_equal_flops"]),
            _fmt(r["bpb_at_equal_elapsed_s"]),
        ]
        for r in comp["rows"]
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]

    def fmt(cells) -> str:
        return "  ".join(
            f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        )

    return "\n".join([fmt(head)] + [fmt(r) for r in rows])


def write_comparison(run_dirs: list[str | Path], out_dir: str | Path) -> tuple[Path, dict]:
    """Write OUT/compare.html (figure + table, self-contained), OUT/compare.png and OUT/compare.json."""
    runs = load_runs(run_dirs)
    comp = comparison(runs)
    out_dir = Path(out_dir)
    figs = Figures(out_dir)
    img = figs.html(
        "compare",
        plots.compare_curves(runs),
        "Validation bits per byte of each run against training tokens, training FLOPs "
        "(analytic, active parameters only) and wall time spent training.",
    )
    b = comp["budgets"]
    head = [
        "run",
        "model",
        "params (active / total)",
        "tokens",
        "FLOPs",
        "time (s)",
        "final val bpb",
        "best val bpb",
        f"bpb at {_fmt(b['tokens'])} tokens",
        f"bpb at {_fmt(b['flops'])} FLOPs",
        f"bpb at {_fmt(b['elapsed_s'], 3)} s",
    ]
    rows = [
        [
            _e(r["run"]),
            _e(r.get("model", "?")),
            f"{_fmt(r.get('params_active'))} / {_fmt(r.get('params_total'))}",
            _fmt(r["tokens"]),
            _fmt(r["flops"]),
            _fmt(r["elapsed_s"], 3),
            _fmt(r["final_bpb"]),
            _fmt(r["best_bpb"]),
            _fmt(r["bpb_at_equal_tokens"]),
            _fmt(r["bpb_at_equal_flops"]),
            _fmt(r["bpb_at_equal_elapsed_s"]),
        ]
        for r in comp["rows"]
    ]
    doc = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>moelab compare</title>"
        f"<style>{CSS}</style></head><body><h1>moelab compare</h1>"
        f"<p class=meta>{len(runs)} runs. The last three columns read each run's validation curve at the largest "
        "budget every run reached (linear interpolation), so longer training earns no credit.</p>"
        + img
        + _table(head, rows, left=2)
        + "</body></html>"
    )
    path = out_dir / "compare.html"
    write_file_atomic(path, doc.encode("utf-8"))
    write_file_atomic(out_dir / "compare.json", json.dumps(comp, indent=1).encode("utf-8"))
    return path, comp
