"""`moelab demo`: tokenizer + data + a small MoE trained on the Python stdlib, samples before/after."""

from __future__ import annotations

NAME = "demo"
HELP = "train a tokenizer and a small MoE on the Python stdlib in ~4 minutes, with samples and a report"
DESCRIPTION = (
    "The whole pipeline in one command: train a SentencePiece tokenizer on the corpus (default: the running "
    "Python's standard library), tokenize it, sample from the untrained model, train configs/demo.yaml "
    "for what the time budget leaves (--minutes, the whole demo: 4 by default), sample again, and write the "
    "report. Samples are scored for how Python-like they look (keywords, indentation, brackets; 0..1), before "
    "and after training. The run directory is kept "
    "(runs/demo, or runs/demo-2, ... when that exists)."
)


def add_arguments(p):
    p.add_argument("--run-dir", help="where to put the run (default runs/demo, never overwritten)")
    p.add_argument(
        "--input",
        nargs="+",
        default=["stdlib"],
        metavar="PATH",
        help="corpus: files, directories, globs or 'stdlib' (default stdlib)",
    )
    p.add_argument("--config", help="config to train (default configs/demo.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=100 (repeatable)",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=4.0,
        help="budget for the whole demo; training gets what the other steps leave, as train.budget_seconds "
        "(default 4; 0 = train.steps, no time budget)",
    )
    p.add_argument("--no-samples", action="store_true", help="skip the before/after samples")
    p.add_argument(
        "--dense-twin",
        action="store_true",
        help="also train the dense model of equal active parameters beside the MoE (same seconds, one thread "
        "each, in RUN/dense-twin) and print both val bits/byte",
    )


def run(args) -> int:
    from moelab.errors import UserError
    from moelab.train.demo import run_demo

    if args.minutes < 0:
        raise UserError(f"--minutes: expected >= 0 (0 = train.steps, no time budget), got {args.minutes:g}")
    run_demo(
        args.run_dir,
        args.input,
        args.overrides,
        args.config,
        samples=not args.no_samples,
        minutes=args.minutes or None,
        dense_twin=args.dense_twin,
    )
    return 0
