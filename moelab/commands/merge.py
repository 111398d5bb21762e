"""`moelab merge RUN OUT`: fold a LoRA run's adapters into its base, writing a plain checkpoint."""

from __future__ import annotations

NAME = "merge"
HELP = "fold a LoRA run's adapters into its base model, writing a plain checkpoint"
DESCRIPTION = (
    "Load the base checkpoint a LoRA run names (refused if its fingerprint changed), add the run's adapters, "
    "fold them into the weights (W + alpha/rank * B A, routed experts included) and write OUT as an "
    "ordinary checkpoint that generate, serve, export and train --init-from read like any other."
)


def add_arguments(p):
    p.add_argument("run", help="LoRA run directory (newest checkpoint) or one of its checkpoint directories")
    p.add_argument("out", help="output checkpoint directory (written atomically; replaced if it exists)")


def run(args) -> int:
    from moelab.finetune.adapters import merge_run

    out = merge_run(args.run, args.out)
    print(f"merged {args.run} -> {out}")
    return 0
