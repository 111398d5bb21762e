"""`moelab bench <name>`: benchmarks that write JSON and print a summary (see BENCHMARKS.md)."""

from __future__ import annotations

import importlib

NAME = "bench"
HELP = "run a benchmark (layer, data, train, generate, ...) and write its JSON results"
DESCRIPTION = "Benchmarks measured side by side in one run; medians of interleaved repeats. Results go to JSON."

# name -> (module implementing add_arguments/run, one-line help). Bench modules import only argparse-level
# things at the top: every `moelab` invocation builds these parsers.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "layer": ("moelab.bench.layer", "one MoE layer vs a dense SwiGLU of equal active FLOPs (and transformers' block)"),
    "data": ("moelab.bench.data", "tokenizer training time, prepare MB/s and peak RSS on a synthetic corpus"),
    "generate": ("moelab.bench.generate", "prefill and decode tokens/s, per-token latency (and transformers')"),
    "serve": ("moelab.bench.serve", "the HTTP server under 1, 8, 32 concurrent clients: req/s, tok/s, TTFT, p50/p99"),
    "train": ("moelab.bench.train", "training tokens/s, MFU and peak RSS, fp32 and bf16 (and transformers' Mixtral)"),
    "quality": ("moelab.bench.quality", "val bits/byte of dense vs MoE vs transformers' Mixtral for equal wall-clock"),
    "distributed": ("moelab.bench.distributed", "training tokens/s on 1 vs 2 processes (dp=2, ep=2) under torchrun"),
    "offload": ("moelab.bench.offload", "resident memory generating with memory-mapped experts vs weight bytes"),
    "rl": ("moelab.bench.rl", "GRPO on arithmetic from a tiny base model: routing replay on vs off; determinism cost"),
    "dynamic": (
        "moelab.bench.dynamic",
        "adaptive k, growing, hierarchical, diversity, multi-task MoE vs fixed top-2 "
        "on a generated multi-domain corpus: bits/byte, experts/token, specialisation, dead experts",
    ),
    "plan": ("moelab.bench.plan", "the memory planner's estimate vs measured peak memory of a training step"),
    "finetune": (
        "moelab.finetune.bench",
        "full vs LoRA-on-experts vs router-only instruction tuning over seeds: held-out exact match per "
        "family vs the base; --memory: optimizer state, gradients, peak RSS, tokens/CPU-s on a preset",
    ),
}


def add_arguments(p):
    sub = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, (module, help_) in BENCHMARKS.items():
        q = sub.add_parser(name, help=help_, description=help_)
        q.set_defaults(_bench_module=module)
        importlib.import_module(module).add_arguments(q)


def run(args) -> int:
    return int(importlib.import_module(args._bench_module).run(args) or 0)
