"""`moelab train CONFIG.yaml [--set k=v ...] [--run-dir DIR] [--resume | --restart] [--init-from CKPT]`."""

from __future__ import annotations

import os
from pathlib import Path

from moelab.errors import UserError

NAME = "train"
HELP = "train a model from a config on a prepared dataset"
DESCRIPTION = (
    "Train from CONFIG on the dataset at data.path (made by `moelab prepare`). The run directory gets the "
    "resolved config, metrics.jsonl, checkpoints/, the tokenizer and TensorBoard events (if installed). "
    "--resume continues the newest usable checkpoint exactly (and stops if there is none); --restart deletes "
    "the run in --run-dir and starts it over; --init-from starts a new run from a "
    "checkpoint's weights. See docs/training.md."
)


def add_arguments(p):
    p.add_argument("config", nargs="?", help="YAML config (optional with --resume: the run's config.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=200 (repeatable)",
    )
    p.add_argument("--run-dir", help="run directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    p.add_argument(
        "--restart",
        action="store_true",
        help="delete the run in --run-dir (checkpoints, metrics, config) and start it over",
    )
    p.add_argument("--init-from", metavar="CKPT", help="start from this checkpoint's (or run's) weights")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="bit-reproducible training (same as --set train.deterministic=true; docs/rl.md)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar; one line per log step")


def run(args) -> int:
    from moelab.train import train

    config = args.config
    if config is None:
        if not ((args.resume or args.restart) and args.run_dir):
            raise UserError("a CONFIG file is required (or --resume/--restart --run-dir DIR to continue/redo a run)")
        config = Path(args.run_dir) / "config.yaml"
        if not config.is_file():
            raise UserError(
                f"{args.run_dir}: no config.yaml, so not a run directory to {'resume' if args.resume else 'restart'}"
            )
    if args.resume and args.restart:
        raise UserError("--resume and --restart exclude each other (resume continues a run; restart deletes it)")
    if args.resume and args.init_from:
        raise UserError("--resume and --init-from exclude each other (resume continues a run; init-from starts one)")
    result = train(
        config,
        run_dir=args.run_dir,
        resume=args.resume,
        init_from=args.init_from,
        overrides=[*args.overrides, *(["train.deterministic=true"] if args.deterministic else [])],
        progress=False if args.no_progress else None,
        restart=args.restart,
    )
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports for everyone
        return 0
    rec = result.last_record
    summary = [f"step {result.step}"]
    if rec.get("stopped") == "max_seconds":  # else "done: step 51" reads like train.steps was 51
        summary[0] += f" (stopped early: train.max_seconds reached after {rec.get('elapsed_s', 0):.0f} s of training)"
    elif rec.get("stopped") == "budget_seconds":
        summary[0] += f" (train.budget_seconds spent: {rec.get('elapsed_s', 0):.0f} s of training)"
    if rec.get("val/loss") is not None:
        bpb = f" ({rec['val/bpb']:.3f} bits/byte)" if rec.get("val/bpb") is not None else ""
        summary.append(f"val loss {rec['val/loss']:.4f}{bpb}")
    if result.skipped_steps:
        summary.append(f"{result.skipped_steps} non-finite steps skipped")
    print(f"done: {', '.join(summary)}")
    print(f"run directory: {result.run_dir}  (metrics.jsonl, checkpoints/)")
    if result.checkpoint:
        print(f"last checkpoint: {result.checkpoint}")
    return 0
