"""`moelab analyze RUN`: expert balance and specialisation on held-out data, as JSON, PNGs and HTML."""

from __future__ import annotations

import sys

NAME = "analyze"
HELP = "routing analysis on held-out data: expert load, specialisation by source, co-activation, report"
DESCRIPTION = (
    "Run the run's newest checkpoint over held-out tokens and report, per MoE layer: load per expert "
    "(fraction and utilisation, 1.0 = fair share), load CV, dead experts, router entropy, the top-k "
    "co-activation matrix and the dropped fraction; and specialisation: routing per source file, the "
    "mutual information between source and expert (with its shuffled chance level), the top tokens per "
    "expert, and how well layer l's expert predicts layer l+1's. Writes RUN/report/analysis.json, PNGs "
    "and the HTML report (with training curves when RUN/metrics.jsonl has records); given a checkpoint "
    "RUN/checkpoints/step_N, the report still goes to RUN/report, where pruning cannot delete it."
)


def add_arguments(p):
    p.add_argument("run", help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--data", default=None, metavar="DATA_DIR", help="prepared dataset (default: the run's data.path)")
    p.add_argument(
        "--tokens",
        type=int,
        default=65536,
        metavar="N",
        help="held-out tokens to trace (default 65536; fewer if the split is smaller)",
    )
    p.add_argument("--split", default="val", help="dataset split to trace (default val)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--top-tokens", type=int, default=10, metavar="N", help="tokens listed per expert (default 10)")
    p.add_argument(
        "--domains",
        default="auto",
        choices=["auto", "file", "dir", "input"],
        help="what a domain is for specialisation: a source file, its directory, or the --input it "
        "came from (default auto: files when there are at most 16, else directories)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


def run(args) -> int:
    from moelab.analysis.run import analyze_run
    from moelab.analysis.trace import format_summary

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\rtracing {done:,}/{total:,} tokens", end="" if done < total else "\n", file=sys.stderr)

    analysis, report = analyze_run(
        args.run,
        data_dir=args.data,
        tokens=args.tokens,
        split=args.split,
        batch_size=args.batch_size,
        top_n=args.top_tokens,
        device=args.device,
        domains=args.domains,
        progress=progress,
    )
    print(format_summary(analysis))
    print(f"analysis: {report.parent / 'analysis.json'}")
    print(f"report: {report}")
    return 0
