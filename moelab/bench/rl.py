"""`moelab bench rl`: GRPO on the arithmetic task from a tiny base model pre-trained here, routing replay
on vs off with the same seeds and budget; plus what deterministic mode costs.

1. Pre-train a tiny MoE on `a+b=c` lines (byte tokenizer, about a minute of CPU). The base config has
   a capacity factor (1.25, also at generation: eval_capacity_factor unset), so which assignments are
   dropped depends on which tokens share a forward -- a decode step's batch at rollout, the whole padded
   batch in training. Without replay the training forward therefore drops other assignments than the
   rollout did: the train/rollout routing mismatch replay removes (in fp32 on CPU, numerics alone
   rarely flip a top-k choice; in bf16 or across kernels they do).
2. GRPO from that model twice, replay on and off: reward curve, routing mismatch, clip fraction, and
   held-out greedy exact match before and after.
3. Deterministic mode: training step time and batched generation throughput with it off and on.
Results: JSON + a plot (reward and mismatch curves); numbers are copied into BENCHMARKS.md by hand.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path


def add_arguments(p):
    p.add_argument("--work-dir", default="benchmarks/rl-work", help="dataset, base model and RL runs")
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=600,
        help="base model training steps (default 600: about a minute on one core; a step count, not a "
        "time budget, so the base model does not depend on the machine's load)",
    )
    p.add_argument("--steps", type=int, default=150, help="GRPO steps per arm (default 150)")
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-prompts", type=int, default=500, help="held-out prompts for exact match (default 500)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default="benchmarks/rl.json")
    p.add_argument("--plot", default="benchmarks/rl.png")


def base_config(data_dir: Path, steps: int, deterministic: bool = False) -> dict:
    return {
        "model": {
            "vocab_size": 264,
            "d_model": 96,
            "n_layers": 3,
            "n_heads": 4,
            "n_kv_heads": 2,
            "ffn_dim": 192,
            "max_seq_len": 64,
            "moe": {"num_experts": 8, "top_k": 2, "expert_dim": 96, "capacity_factor": 1.25, "load_balance_coef": 0.01},
        },
        "data": {"path": str(data_dir), "seq_len": 64},
        "train": {
            "steps": steps,
            "batch_size": 32,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 50,
            "seed": 0,
            "peak_flops": 0,  # no MFU: not what this bench compares
            "schedule": "constant",
            "deterministic": deterministic,
        },
        "eval": {"every": 0, "batches": 4},
        "checkpoint": {"every": 0, "keep_last": 1, "keep_best": False},
        "log": {"progress": False, "every": 50, "tensorboard": False},
    }


def _pretrain(work: Path, steps: int, seed: int) -> Path:
    from moelab.data import prepare
    from moelab.rl.tasks import task_text
    from moelab.train import train

    data_dir = work / "data"
    if not (data_dir / "meta.json").is_file():
        (work / "corpus").mkdir(parents=True, exist_ok=True)
        (work / "corpus" / "arith.txt").write_text(task_text("arithmetic", seed + 12345, 40000), encoding="utf-8")
        prepare([str(work / "corpus")], "byte", data_dir, val_fraction=0.05, doc_boundary="line", workers=0)
    run = work / "base"
    if not (run / "checkpoints").is_dir():
        train(base_config(data_dir.resolve(), steps), run_dir=run, progress=False)
    return run


def _determinism_cost(work: Path, base: Path, threads: int) -> dict:
    """Training: s/step over 30 steps, off vs on. Generation: tokens/s for 16 greedy prompts, off vs on."""
    import torch

    from moelab.checkpoint import load_model
    from moelab.infer.generate import generate
    from moelab.rl.tasks import task_prompts
    from moelab.tokenizer import Tokenizer
    from moelab.train import train

    out: dict = {}
    for det in (False, True):
        cfg = base_config((work / "data").resolve(), 30, det)
        shutil.rmtree(work / f"det-{det}", ignore_errors=True)
        r = train(cfg, run_dir=work / f"det-{det}", progress=False)
        out[f"train_s_per_step_{'on' if det else 'off'}"] = r.last_record["elapsed_s"] / 30
        torch.use_deterministic_algorithms(False)
    model, _, ckpt = load_model(base)
    tok = Tokenizer.load(ckpt / "tokenizer")
    prompts = [p for p, _ in task_prompts("arithmetic", 99, 16)]
    for det in (False, True):
        t0 = time.perf_counter()
        outs = generate(
            model, tok, prompts, max_new_tokens=16, temperature=0, return_logits="logprobs", deterministic=det
        )
        n = sum(len(o.token_ids) for o in outs)
        out[f"generate_tok_per_s_{'on' if det else 'off'}"] = n / (time.perf_counter() - t0)
    return out


def run(args) -> int:
    import torch

    from moelab.rl.grpo import RLConfig, RLTrainer

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = _pretrain(work, args.pretrain_steps, args.seed)
    results: dict = {"pretrain_s": time.perf_counter() - t0, "threads": args.threads, "arms": {}}
    print(f"base model pre-trained in {results['pretrain_s']:.0f}s", flush=True)
    for replay in (True, False):
        name = "replay" if replay else "no_replay"
        run_dir = work / f"rl-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = RLConfig(
            init_from=str(base),
            run_dir=str(run_dir),
            task="arithmetic",
            steps=args.steps,
            prompts_per_step=args.prompts_per_step,
            group_size=args.group_size,
            max_new_tokens=4,
            lr=args.lr,
            replay=replay,
            seed=args.seed,
            checkpoint_every=args.steps,
            eval_prompts=args.eval_prompts,
            threads=args.threads,
        )
        trainer = RLTrainer(cfg)
        before = trainer.evaluate(args.eval_prompts)["eval/exact_match"]
        t1 = time.perf_counter()
        res = trainer.run()
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        arm = {
            "exact_match_before": before,
            "exact_match_after": res.eval["eval/exact_match"],
            "seconds": time.perf_counter() - t1,
            **{
                k: [r[f"rl/{k}"] for r in recs]
                for k in ("reward", "routing_mismatch", "router_drift", "clip_fraction", "kl")
            },
        }
        for k in ("routing_mismatch", "router_drift", "clip_fraction"):
            arm[f"mean_{k}"] = sum(arm[k]) / len(arm[k])
        results["arms"][name] = arm
        print(
            f"[{name}] exact match {before:.3f} -> {arm['exact_match_after']:.3f}, mean routing mismatch "
            f"{arm['mean_routing_mismatch']:.4f}, clip fraction {arm['mean_clip_fraction']:.4f} "
            f"({arm['seconds']:.0f}s)",
            flush=True,
        )
    results["determinism"] = _determinism_cost(work, base, args.threads)
    print(f"determinism: {results['determinism']}", flush=True)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(results, indent=1), encoding="utf-8")
    _plot(results, Path(args.plot))
    print(f"wrote {args.json_out} and {args.plot} in {time.perf_counter() - t0:.0f}s")
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, arm in results["arms"].items():
        xs = range(1, len(arm["reward"]) + 1)
        k = 5
        smooth = [
            sum(arm["reward"][max(0, i - k + 1) : i + 1]) / len(arm["reward"][max(0, i - k + 1) : i + 1])
            for i in range(len(arm["reward"]))
        ]
        axes[0].plot(
            xs, smooth, label=f"{name} (held-out EM {arm['exact_match_before']:.2f} -> {arm['exact_match_after']:.2f})"
        )
        axes[1].plot(xs, arm["routing_mismatch"], label=name)
        axes[2].plot(xs, arm["clip_fraction"], label=name)
    for ax, title in zip(
        axes, ["rollout reward (5-step mean)", "train/rollout routing mismatch", "clip fraction"], strict=True
    ):
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
