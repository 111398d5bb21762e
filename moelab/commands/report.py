"""`moelab report RUN`: training curves and expert-load heatmaps as one self-contained HTML file."""

from __future__ import annotations

NAME = "report"
HELP = "write RUN/report/report.html: training curves, expert load over training, routing analysis"
DESCRIPTION = (
    "Build one self-contained HTML report (figures embedded) from RUN/metrics.jsonl: loss, validation "
    "bits per byte, learning rate, tokens/s, each auxiliary loss, and per-layer expert-load heatmaps over "
    "training. If `moelab analyze RUN` has run, its routing analysis is included too."
)


def add_arguments(p):
    p.add_argument("run", help="run directory (written by `moelab train`)")


def run(args) -> int:
    from moelab.analysis.report import write_report

    path = write_report(args.run, require_training=True)
    print(f"report: {path}")
    return 0
