"""`moelab info CONFIG.yaml`: parameters, FLOPs per token and memory for a config."""

from __future__ import annotations

import json

from moelab.config import load_config
from moelab.model.counting import DTYPE_BYTES, summary

NAME = "info"
HELP = "show total/active parameters, FLOPs per token and memory for a config"
DESCRIPTION = (
    "Print total and active parameters, per-token FLOPs (PaLM convention: 2 per active matmul "
    "parameter plus attention, training = 3x) and bytes for weights, gradients and AdamW state."
)


def add_arguments(p):
    p.add_argument("config", help="YAML config file (e.g. configs/tiny.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set moe.top_k=2 (repeatable)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(k for k in DTYPE_BYTES if len(k) > 4),
        help="dtype for weight and gradient bytes (default float32)",
    )
    p.add_argument("--seq-len", type=int, default=None, help="context for attention FLOPs (default data.seq_len)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.add_argument(
        "--mean-k",
        type=float,
        default=None,
        metavar="K",
        help="experts per token for active parameters and FLOPs: an adaptive router's measured mean "
        "(metrics.jsonl moe/<i>/k_mean); default moe.top_k (k_max for top_p / null experts)",
    )


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.3g}E{unit}"


def _bytes(n: int) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {suffix}" if suffix != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} PiB"


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.mean_k is not None and not 0 <= args.mean_k <= cfg.model.moe.top_k:
        from moelab.errors import UserError

        raise UserError(f"--mean-k: expected 0 <= K <= moe.top_k={cfg.model.moe.top_k}, got {args.mean_k}")
    info = summary(cfg.model, args.dtype, args.seq_len or cfg.data.seq_len, args.mean_k)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p, f, m = info["params"], info["flops_per_token"], info["memory_bytes"]
    rows = [
        ("total parameters", f"{p['total']:,}", _human(p["total"])),
        ("active parameters / token", f"{p['active']:,}", f"{100 * p['active'] / p['total']:.1f}% of total"),
        ("  embedding", f"{p['embedding']:,}", ""),
        ("  attention", f"{p['attention']:,}", ""),
        ("  dense FFN", f"{p['dense_ffn']:,}", ""),
        (
            "  routed experts (all)",
            f"{p['routed_experts']:,}",
            f"{info['num_experts']} experts, top-{info['top_k']}, MoE layers {info['moe_layers']}"
            + (f", mean k {info['active_k']:g}" if args.mean_k is not None else ""),
        ),
        ("  routed experts (active)", f"{p['active_routed_experts']:,}", ""),
        ("  shared experts", f"{p['shared_experts']:,}", ""),
        ("  routers", f"{p['routers']:,}", ""),
        ("  LM head", f"{p['lm_head']:,}", "tied" if p["lm_head"] == 0 else ""),
        ("FLOPs / token, inference", f"{f['inference']:,}", _human(f["inference"], "FLOP")),
        ("FLOPs / token, training", f"{f['train']:,}", f"at seq_len {info['seq_len']}"),
        (f"weights ({info['dtype']})", f"{m['weights']:,}", _bytes(m["weights"])),
        (f"gradients ({info['dtype']})", f"{m['grads']:,}", _bytes(m["grads"])),
        ("AdamW state", f"{m['adamw_state']:,}", _bytes(m["adamw_state"])),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{args.config}")
    for name, value, note in rows:
        print(f"  {name:<{w0}}  {value:>{w1}}  {note}")
    return 0
