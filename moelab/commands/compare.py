"""`moelab compare RUN_A RUN_B ...`: validation bits per byte at equal tokens, FLOPs and wall time."""

from __future__ import annotations

from pathlib import Path

NAME = "compare"
HELP = "compare runs: val bits-per-byte against tokens, FLOPs and wall time, with a table"
DESCRIPTION = (
    "Plot each run's validation bits per byte against training tokens, training FLOPs and wall time on "
    "one figure, and tabulate the values every run reached at equal budgets: how to see whether an MoE "
    "beats a dense model at equal compute. Writes compare.html (self-contained), compare.png and "
    "compare.json."
)


def add_arguments(p):
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (written by `moelab train`)")
    p.add_argument("--out", default=None, help="output directory (default: compare/ next to the first run)")


def run(args) -> int:
    from moelab.analysis.compare import format_table, write_comparison

    out = Path(args.out) if args.out else Path(args.runs[0]).resolve().parent / "compare"
    path, comp = write_comparison(args.runs, out)
    print(format_table(comp))
    print(f"report: {path}")
    return 0
