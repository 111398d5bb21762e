"""`moelab bench offload`: resident memory while generating with memory-mapped experts, against the
total weight bytes, per placement policy; with hit rate, bytes moved, stall time and tokens/s.

A random-weight model whose routed experts are most of its bytes is written once as a checkpoint.
Each policy then runs in a fresh process: load (resident model = `moelab.checkpoint.load_model`,
others = `moelab.offload.load_offloaded`), greedy-generate from a few prompts, and report the peak
resident set (VmHWM) above the process's resident set before loading. Random weights route tokens
about uniformly over experts, the worst case for a cache; trained models are more skewed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from moelab.bench import write_results

MODEL = {
    "vocab_size": 512,
    "d_model": 512,
    "n_layers": 4,
    "n_heads": 8,
    "n_kv_heads": 4,
    "ffn_dim": 1024,
    "max_seq_len": 256,
    "moe": {"num_experts": 64, "top_k": 2, "expert_dim": 1024},
}
POLICIES = ["resident", "keep-all", "lru:32", "lru:8", "host-layers:2+lru:8"]


def add_arguments(p):
    p.add_argument("--policies", nargs="+", default=POLICIES, help="'resident' or placement specs (lru:N, ...)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=2, help="prompts generated together")
    p.add_argument("--json", dest="json_out", default="benchmarks/offload.json", help="where to write results")


def _status() -> tuple[int, int]:
    from moelab.bench.plan import rss_and_peak

    return rss_and_peak()


def measure(ckpt: str, policy: str, new_tokens: int, prompts: int) -> dict:
    """Run in a fresh process: load with `policy`, generate, report memory and cache metrics."""
    import time

    import torch

    from moelab.infer.generate import generate
    from moelab.tokenizer import ByteTokenizer

    torch.set_num_threads(1)
    rss0, _ = _status()
    t0 = time.perf_counter()
    if policy == "resident":
        from moelab.checkpoint import load_model

        model, _, _ = load_model(ckpt)
        placement = None
    else:
        from moelab.offload import load_offloaded

        model, _, placement = load_offloaded(ckpt, policy)
    load_s = time.perf_counter() - t0
    text = ["The quick brown fox", "Mixture of experts"] * prompts
    t0 = time.perf_counter()
    generate(model, ByteTokenizer(), text[:prompts], max_new_tokens=new_tokens, temperature=0)
    gen_s = time.perf_counter() - t0
    rss, hwm = _status()
    out = {
        "policy": policy,
        "peak_rss_above_start": hwm - rss0,
        "rss_after": rss - rss0,
        "load_s": load_s,
        "generate_s": gen_s,
        "tokens_per_s": prompts * new_tokens / gen_s,
    }
    if placement is not None:
        out["metrics"] = placement.metrics.to_dict()
        out["expert_cache_bytes"] = placement.resident_bytes()
    return out


def run(args) -> int:
    import torch

    from moelab.checkpoint import save_checkpoint
    from moelab.config import Config, from_dict
    from moelab.model import Transformer
    from moelab.model.counting import count_params

    cfg = from_dict(Config, {"model": MODEL, "data": {"seq_len": 128}})
    pc = count_params(cfg.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_checkpoint(Path(tmp) / "ck", Transformer(cfg.model), cfg)
        file_bytes = (Path(tmp) / "ck" / "model.safetensors").stat().st_size
        for policy in args.policies:
            code = (
                "import json,sys; from moelab.bench.offload import measure; "
                "print(json.dumps(measure(*json.loads(sys.argv[1]))))"
            )
            res = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    code,
                    json.dumps([str(Path(tmp) / "ck"), policy, args.new_tokens, args.prompts]),
                ],
                capture_output=True,
                text=True,
            )
            if res.returncode:
                raise RuntimeError(f"{policy}: {res.stderr[-2000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["peak_rss_over_weights"] = row["peak_rss_above_start"] / file_bytes
            rows.append(row)
            m = row.get("metrics", {})
            print(
                f"{policy:22s} peak RSS {row['peak_rss_above_start'] / 2**20:7.1f} MiB "
                f"({100 * row['peak_rss_over_weights']:5.1f}% of {file_bytes / 2**20:.0f} MiB weights)  "
                f"{row['tokens_per_s']:6.1f} tok/s"
                + (
                    f"  hit rate {m['hit_rate']:.2f}  moved {m['bytes_moved'] / 2**20:.0f} MiB  "
                    f"stalled {m['stall_seconds']:.2f}s"
                    if m
                    else ""
                ),
                flush=True,
            )
    result = {
        "model": MODEL,
        "params_total": pc.total,
        "routed_expert_params": pc.routed_experts,
        "weight_file_bytes": file_bytes,
        "new_tokens": args.new_tokens,
        "prompts": args.prompts,
        "rows": rows,
    }
    write_results(args.json_out, result)
    return 0
