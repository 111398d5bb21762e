"""Reading a run's training log (RUN/metrics.jsonl) into series the plots and tables use."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from moelab.errors import UserError


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN/metrics.jsonl, in file order. A torn last line (a run killed mid-write) is
    skipped; any other line that is not a JSON object (or not UTF-8) is an error naming the line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no training log (is {run_dir} a run directory written by `moelab train`?)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    # bytes, not text: a corrupt byte must become a numbered line error, not a UnicodeDecodeError
    lines = raw.splitlines()
    records, torn = [], None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if n == len(lines):
                torn = n
                continue
            why = "not UTF-8" if isinstance(e, UnicodeDecodeError) else e.msg
            raise UserError(f"{path}:{n}: not a JSON object ({why})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or isinstance(rec["step"], bool):
            shown = line[:60].decode("utf-8", errors="replace")
            raise UserError(f"{path}:{n}: expected a JSON object with an integer 'step', got {shown!r}")
        records.append(_renamed(rec))
    if not records and torn is not None:
        raise UserError(
            f"{path}: no complete training records: line {torn}, the only one, is cut off or not "
            "JSON (a run killed while writing its first record?)"
        )
    if not records:
        raise UserError(
            f"{path}: no training records yet (the file is empty); train for at least one log step (log.every) first"
        )
    return records


_OLD_LOAD_CV = re.compile(r"^moe/(\d+)/cv$")


def _renamed(rec: dict) -> dict:
    """Runs logged before the hard load CV got its own name (`moe/<i>/cv`) read as today's."""
    for key in [k for k in rec if _OLD_LOAD_CV.match(k)]:
        rec.setdefault(key[:-2] + "load_cv", rec.pop(key))
    return rec


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def series(records: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x values, values) of the records holding a finite `key` and `x`."""
    xs, ys = [], []
    for r in records:
        xv, yv = _number(r.get(x)), _number(r.get(key))
        if xv is not None and yv is not None:
            xs.append(xv)
            ys.append(yv)
    return xs, ys


def keys_with_prefix(records: list[dict], prefix: str) -> list[str]:
    """Keys starting with `prefix` in any record, in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        for k in r:
            if k.startswith(prefix):
                seen.setdefault(k)
    return list(seen)


def moe_layers(records: list[dict]) -> list[int]:
    """MoE layer indices that have a `moe/<i>/load` entry."""
    return sorted(
        {
            int(k.split("/")[1])
            for k in keys_with_prefix(records, "moe/")
            if k.endswith("/load") and k.split("/")[1].isdigit()
        }
    )


def load_over_time(records: list[dict], layer: int) -> tuple[list[int], list[list[float]]]:
    """(steps, per-record expert load fractions) of one MoE layer. Every record must list the same
    number of experts (a heatmap has one row per expert)."""
    steps, loads = [], []
    for r in records:
        load = r.get(f"moe/{layer}/load")
        if isinstance(load, list) and load and all(_number(v) is not None for v in load):
            if loads and len(load) != len(loads[0]):
                raise UserError(
                    f"metrics.jsonl: step {r['step']}: moe/{layer}/load lists {len(load)} experts, "
                    f"step {steps[0]} listed {len(loads[0])} (records from different runs?)"
                )
            steps.append(r["step"])
            loads.append([float(v) for v in load])
    return steps, loads


def last_value(records: list[dict], key: str) -> float | None:
    for r in reversed(records):
        v = _number(r.get(key))
        if v is not None:
            return v
    return None


def best_value(records: list[dict], key: str) -> float | None:
    vals = [v for v in (_number(r.get(key)) for r in records) if v is not None]
    return min(vals) if vals else None
