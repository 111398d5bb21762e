"""The run directory: where a run's config, metrics and checkpoints live, and the rules for reusing it.

    RUN/config.yaml     the resolved Config (data.path made absolute); written once, before step 1
    RUN/run.json        how the run was started (moelab version, init_from, start time)
    RUN/metrics.jsonl   one record per log step (see telemetry.py)
    RUN/tokenizer/      copy of the dataset's tokenizer
    RUN/checkpoints/    step_XXXXXXX/ training checkpoints, `best` -> the lowest val loss
    RUN/tb/             TensorBoard events (when tensorboard is installed)
    RUN/report/         analysis output (written by `moelab report`)

A directory that already holds a run (config.yaml, metrics.jsonl or checkpoints/) is never trained
into again without `--resume` (continue) or `--restart` (delete the run, start over); an empty or
data-only directory is fine. A new run writes tokenizer/ and run.json first and config.yaml last, so a
kill at any moment leaves either a complete run directory or one that does not count as a run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import yaml

from moelab.config import Config, from_dict, read_yaml
from moelab.errors import UserError
from moelab.fileio import remove_dir, write_file_atomic

# Config keys that may change when a run is resumed: they alter how long it runs, what it logs or how
# fast it computes, never the numbers of a step already taken. Anything else must match the run's.
RESUME_MAY_CHANGE = (
    "train.steps",
    "train.max_seconds",
    "train.budget_seconds",  # like train.steps: a longer budget stretches the rest of the schedule
    "train.compile",
    "train.activation_checkpointing",
    "train.peak_flops",
    "train.max_bad_steps",
    "train.device",
    "log.",
    "eval.",
    "checkpoint.",
    "parallel.",  # checkpoints hold full tensors: any mesh resumes any other
    "finetune.base",
)  # a LoRA run resumes on the base pinned in its own config.yaml


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / n).exists() for n in ("config.yaml", "metrics.jsonl", "checkpoints"))


def default_run_dir(name: str | None) -> Path:
    return Path("runs") / (name or time.strftime("run-%Y%m%d-%H%M%S"))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def incompatible(saved: Config, new: Config) -> list[str]:
    """Keys whose values differ between a run's config and a config offered for resuming it."""
    a, b = _flatten(dataclasses.asdict(saved)), _flatten(dataclasses.asdict(new))
    return [
        f"{k} (run: {a.get(k)!r}, now: {b.get(k)!r})"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not k.startswith(RESUME_MAY_CHANGE)
    ]


def read_run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir}: --resume needs a run directory with config.yaml; none found")
    return from_dict(Config, read_yaml(path), source=str(path))


def absolute_data_path(cfg: Config) -> Config:
    if cfg.data.path:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(Path(cfg.data.path).resolve())))
    return cfg


def prepare_run_dir(cfg: Config, run_dir: Path, resume: bool, restart: bool = False) -> Config:
    """Check the directory against `resume` and return the config to train with (the run's own when
    resuming; `cfg` may then differ only in RESUME_MAY_CHANGE keys)."""
    if resume:
        saved = read_run_config(run_dir)
        diff = incompatible(saved, cfg)
        if diff:
            raise UserError(
                f"{run_dir}: --resume with a config that differs from the run's config.yaml in "
                f"{'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''} "
                "(start a new run, or use --init-from to start from its weights)"
            )
        return cfg
    if holds_run(run_dir) and not restart:
        raise UserError(
            f"{run_dir}: already holds a run; pass --resume to continue it, --restart to delete it "
            "and start over, or choose another --run-dir"
        )
    return cfg


# What `--restart` deletes: everything a run writes except report/ (analysis output, rewritten on demand).
# config.yaml goes last, so a kill in the middle leaves a directory that still says it holds a run.
RUN_FILES = ("metrics.jsonl", "run.json", "checkpoints", "tb", "tokenizer", "config.yaml")


def clear_run(run_dir: Path) -> None:
    for name in RUN_FILES:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            remove_dir(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def no_checkpoint_message(run_dir: Path, bad: list[tuple[Path, str]]) -> str:
    """One line for a --resume that has nothing to resume from (nothing is changed in the run)."""
    if bad:
        why = "; ".join(f"{p.name}: {reason}" for p, reason in bad[:2]) + (" ..." if len(bad) > 2 else "")
        what = f"none of its {len(bad)} checkpoint(s) is usable ({why})"
    else:
        what = "it has no checkpoint (killed before the first one was written?)"
    return (
        f"{run_dir}: cannot resume: {what}; start it over with --restart (deletes its checkpoints and "
        "metrics) or train into a new --run-dir"
    )


def write_config(cfg: Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_file_atomic(run_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def write_run_info(run_dir: Path, info: dict) -> None:
    from moelab.version import __version__

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        old = {}  # written atomically since fileio; an older, torn run.json is history only
    starts = old.get("starts", []) + [{"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}]
    write_file_atomic(path, json.dumps({"moelab": __version__, "starts": starts}, indent=1))
