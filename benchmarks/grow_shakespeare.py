"""Growing 8 -> 16 experts where the expert count pays (issue 16): tinyshakespeare, bytes.

`moelab bench dynamic`'s corpus could not show a growth gain because 16 experts trained from scratch were
no better than 8 there (BENCHMARKS.md, "Dynamic MoE"). This runs the same question on a corpus where total
expert capacity matters (a 1 MB text seen for several epochs, as in the quality study): an 8-expert top-2
MoE, the same with 16 experts from scratch (the upper bound), and the 8-expert run doubled to 16 mid-run
(`schedule.grow_at`, split noise). Same seed = same data order and initialisation; val bits/byte over the
whole validation split. 1 thread per run; run two at once on two cores.

    PYTHONPATH=. python benchmarks/grow_shakespeare.py DATA_DIR WORK_DIR OUT.jsonl VARIANT SEED [--steps N]

VARIANT: e8, e16 or grow (`--grow-at N`: at step N, default steps / 2). Appends one JSON line per run (the
val curve, the loss right before / after growing, final bits/byte). Summarise with `--summary OUT.jsonl`.
"""

import argparse
import json
import statistics
import time
from pathlib import Path


def config(data_dir: str, variant: str, seed: int, steps: int, grow_at: int | None = None, anneal: int = 100) -> dict:
    experts = 16 if variant == "e16" else 8
    cfg = {
        "model": {
            "vocab_size": 257,
            "d_model": 128,
            "n_layers": 4,
            "n_heads": 4,
            "n_kv_heads": 2,
            "ffn_dim": 256,
            "max_seq_len": 256,
            "moe": {
                "num_experts": experts,
                "top_k": 2,
                "expert_dim": 128,
                "router": "softmax_topk",
                "load_balance_coef": 0.01,
                "z_loss_coef": 0.001,
            },
        },
        "data": {"path": data_dir, "seq_len": 256},
        "train": {
            "steps": steps,
            "batch_size": 8,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 50,
            "seed": seed,
            "peak_flops": 0,
        },
        "eval": {"every": steps // 10, "batches": 64},  # 64 x 8 windows cover the whole val split
        "checkpoint": {"every": 0, "keep_last": 1, "keep_best": False},
        "log": {"every": steps // 10, "progress": False, "tensorboard": False},
    }
    if variant == "grow":
        at = grow_at or steps // 2
        cfg["schedule"] = {"grow_at": [at], "grow_anneal_steps": anneal, "grow_split_noise": 0.3}
    return cfg


def run(args) -> None:
    import torch

    from moelab.train.loop import train

    torch.set_num_threads(1)
    name = args.variant if args.variant != "grow" or not args.grow_at else f"grow{args.grow_at}"
    run_dir = Path(args.work_dir) / f"{name}-s{args.seed}"
    t0 = time.perf_counter()
    cfg = config(args.data_dir, args.variant, args.seed, args.steps, args.grow_at, args.anneal)
    train(cfg, run_dir, progress=False, restart=True)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["val/bpb"]) for r in recs if r.get("val/bpb") is not None]
    grow = next((r for r in recs if "grow/experts" in r), {})
    row = {
        "variant": name,
        "anneal_steps": args.anneal if args.variant == "grow" else None,
        "seed": args.seed,
        "steps": args.steps,
        "final_bpb": curve[-1][1],
        "curve": curve,
        "wall_s": time.perf_counter() - t0,
        **{k.split("/", 1)[1]: v for k, v in grow.items() if k.startswith("grow/")},
    }
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "curve"}))


def summary(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    by = {(r["variant"], r["seed"]): r for r in rows}
    for v in ["e16"] + sorted({w for w, _ in by if w.startswith("grow")}):
        deltas = [by[v, s]["final_bpb"] - by["e8", s]["final_bpb"] for (w, s) in by if w == v and ("e8", s) in by]
        if deltas:
            sd = statistics.stdev(deltas) if len(deltas) > 1 else float("nan")
            each = ", ".join(f"{d:+.4f}" for d in deltas)
            print(f"{v} - e8 final bpb: {each} (mean {statistics.mean(deltas):+.4f}, sd {sd:.4f})")
    for (v, s), r in sorted(by.items()):
        if v.startswith("grow"):
            b, a = r["val_loss_before"], r["val_loss_after"]
            print(f"{v} seed {s}: val loss before {b:.4f} after {a:.4f} ({100 * r['rel_change']:+.3f}%)")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("data_dir", nargs="?")
    p.add_argument("work_dir", nargs="?")
    p.add_argument("out", nargs="?")
    p.add_argument("variant", nargs="?", choices=["e8", "e16", "grow"])
    p.add_argument("seed", nargs="?", type=int)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--grow-at", type=int, help="step of the growth (default steps / 2); names the variant growN")
    p.add_argument("--anneal", type=int, default=100, help="schedule.grow_anneal_steps (default 100)")
    p.add_argument("--summary")
    a = p.parse_args()
    summary(a.summary) if a.summary else run(a)
