"""Growing 8 -> 16 experts where the expert count pays (issue 16): tinyshakespeare, bytes.

`moelab bench dynamic`'s corpus could not show a growth gain because 16 experts trained from scratch were
no better than 8 there (BENCHMARKS.md, "Dynamic MoE"). This runs the same question on a corpus where total
expert capacity matters (a 1 MB text seen for several epochs, as in the quality study): an 8-expert top-2
MoE, the same with 16 experts from scratch (the upper bound), and the 8-expert run doubled to 16 mid-run
(`schedule.grow_at`, split noise). Same seed = same data order and initialisation; val bits/byte over the
whole validation split. 1 thread per run; run two at once on two cores.

    PYTHONPATH=. python benchmarks/grow_shakespeare.py DATA_DIR WORK_DIR OUT.jsonl VARIANT SEED [--steps N]

VARIANT: e8, e16 or grow. Appends one JSON line per run (the val curve, the loss right before / after
growing, final bits/byte). Summarise with `--summary OUT.jsonl`.
"""

import argparse
import json
import statistics
import time
from pathlib import Path


def config(data_dir: str, variant: str, seed: int, steps: int) -> dict:
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
        cfg["schedule"] = {"grow_at": [steps // 2], "grow_anneal_steps": 100, "grow_split_noise": 0.3}
    return cfg


def run(args) -> None:
    import torch

    from moelab.train.loop import train

    torch.set_num_threads(1)
    run_dir = Path(args.work_dir) / f"{args.variant}-s{args.seed}"
    t0 = time.perf_counter()
    train(config(args.data_dir, args.variant, args.seed, args.steps), run_dir, progress=False, restart=True)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["val/bpb"]) for r in recs if r.get("val/bpb") is not None]
    grow = next((r for r in recs if "grow/experts" in r), {})
    row = {
        "variant": args.variant,
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
    for v in ("e16", "grow"):
        deltas = [by[v, s]["final_bpb"] - by["e8", s]["final_bpb"] for (w, s) in by if w == v and ("e8", s) in by]
        if deltas:
            sd = statistics.stdev(deltas) if len(deltas) > 1 else float("nan")
            print(f"{v} - e8 final bpb: {', '.join(f'{d:+.4f}' for d in deltas)} (mean {statistics.mean(deltas):+.4f}, sd {sd:.4f})")
    for (v, s), r in sorted(by.items()):
        if v == "grow":
            print(f"grow seed {s}: val loss before {r['val_loss_before']:.4f} after {r['val_loss_after']:.4f} ({100 * r['rel_change']:+.3f}%)")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("data_dir", nargs="?")
    p.add_argument("work_dir", nargs="?")
    p.add_argument("out", nargs="?")
    p.add_argument("variant", nargs="?", choices=["e8", "e16", "grow"])
    p.add_argument("seed", nargs="?", type=int)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--summary")
    a = p.parse_args()
    summary(a.summary) if a.summary else run(a)
