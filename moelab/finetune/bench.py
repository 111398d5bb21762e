"""`moelab bench finetune`: full vs LoRA-on-experts vs router-only instruction tuning of one small base,
over several seeds; `--memory` measures memory and speed of the three on a preset instead
(`bench_memory.py`).

Per seed (the task, the base and every fine-tune are the seed's own; `bench_task.py` describes the task):
pre-train a base (32 experts of width 32, top-8, by default: `--experts`, `--top-k`) on prose that
states the test, validation and train items, then fine-tune it three ways on chat conversations about
the train items, and score greedy exact match on the held-out test questions in the chat template — the
base and all three fine-tunes on the same questions. Each fine-tune runs once per learning rate of its
list (`--full-lrs`, `--lora-lrs`, `--router-lrs`) and scores the validation items every `--eval-every`
steps (early stopping); the point reported is chosen per seed on the validation items only, never the
test items (exact match, answer loss on a tie), out of every rate's best point and the base itself
(step 0: a variant that never beats the base on validation is reported as the base). Every tried rate's
validation curve and test score at its chosen point are in the JSON. Reported: exact match per family
and overall, mean and spread over seeds, how many seeds beat the base, the share of routing decisions
on the test prompts that the fine-tune changed, trainable parameters, optimizer state bytes, wall time,
tokens/s.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

VARIANTS = ("full", "lora_experts", "router_only")


def add_arguments(p) -> None:
    p.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds, one task + base + fine-tunes each")
    p.add_argument(
        "--steps",
        type=int,
        default=150,
        help="optimizer steps per fine-tune, at most (default 150; early stopping may keep an earlier point)",
    )
    p.add_argument("--base-steps", type=int, default=1000, help="pre-training steps of the base (default 1000)")
    p.add_argument("--held-out", type=int, default=150, help="held-out test questions, a third per family")
    p.add_argument(
        "--val",
        type=int,
        default=60,
        help="validation questions (choose each variant's lr and step; never the test questions)",
    )
    p.add_argument("--train-items", type=int, default=90, help="fine-tune train questions")
    p.add_argument("--known-train", type=int, default=None, help="train items the base's prose states (default all)")
    p.add_argument("--repeats", type=int, default=8, help="times each seen item is stated in the prose")
    p.add_argument(
        "--chat-in-base", type=int, default=10, help="train items per family also in the base's stream as chats"
    )
    p.add_argument(
        "--router-lrs", default="3e-4,1e-3", help="router-only learning rates to choose from (default 3e-4,1e-3)"
    )
    p.add_argument(
        "--full-lrs", default="3e-5,1e-4", help="full fine-tuning learning rates to choose from (default 3e-5,1e-4)"
    )
    p.add_argument("--lora-lrs", default="1e-4,3e-4", help="LoRA learning rates to choose from (default 1e-4,3e-4)")
    p.add_argument(
        "--eval-every",
        type=int,
        default=25,
        help="score the validation items every N fine-tune steps and keep the best point (early stopping; "
        "0 = only at the end; default 25)",
    )
    p.add_argument(
        "--experts", type=int, default=32, help="routed experts of the base, of width 1024 / experts (default 32)"
    )
    p.add_argument("--top-k", type=int, default=8, help="experts per token of the base (default 8)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument(
        "--out",
        default=None,
        help="JSON results file (default benchmarks/finetune.json; benchmarks/finetune_memory.json with --memory)",
    )
    p.add_argument("--memory", action="store_true", help="memory and tokens/s of the three on --preset instead")
    p.add_argument("--preset", default="small", help="--memory: the model preset (default small)")
    p.add_argument("--batch-size", type=int, default=4, help="--memory: rows per step (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="--memory: tokens per row (default 256)")
    p.add_argument("--mem-steps", type=int, default=3, help="--memory: timed steps after one warm-up step")


EXPERT_WIDTH = 1024  # summed width of the routed experts, whatever their number: E x expert_dim


def _model_cfg(experts: int = 32, top_k: int = 8) -> dict:
    """The base: d_model 128, 2 layers; `experts` routed experts of width 1024 / experts, `top_k` active
    (the default 32 x 32 top-8 has the same expert parameters and active width as 8 x 128 top-2)."""
    return {
        "vocab_size": 264,
        "d_model": 128,
        "n_layers": 2,
        "n_heads": 4,
        "ffn_dim": 256,
        "max_seq_len": 64,
        "moe": {"num_experts": experts, "top_k": top_k, "expert_dim": EXPERT_WIDTH // experts},
    }


def _train_cfg(steps: int, lr: float, data: str | None, seed: int, model: dict, **finetune) -> dict:
    return {
        "model": model,
        "data": {"seq_len": 63, "path": data},
        "train": {
            "steps": steps,
            "batch_size": 16,
            "lr": lr,
            "min_lr": lr / 10,
            "warmup_steps": min(10, steps // 2),
            "weight_decay": 0.0,
            "peak_flops": 0,  # no MFU: not what this bench compares
            "seed": seed,
        },
        "eval": {"every": 0, "batches": 1},
        "checkpoint": {"every": 0, "keep_best": False},
        "log": {"every": 50, "progress": False, "tensorboard": False},
        "finetune": finetune,
    }


def _lrs(text: str, variant: str = "router_only") -> list[float]:
    from moelab.errors import UserError

    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        lrs = []
    if not lrs or any(lr <= 0 for lr in lrs):
        flag = {"full": "--full-lrs", "lora_experts": "--lora-lrs", "router_only": "--router-lrs"}[variant]
        raise UserError(f"{flag}: expected comma-separated positive numbers, got {text!r}")
    return lrs


def _better(a: dict, b: dict | None) -> bool:
    """The validation rule: higher exact match, then lower answer loss on a tie."""
    return b is None or (a["val_em"]["all"], -a["val_loss"]) > (b["val_em"]["all"], -b["val_loss"])


def _fine_tune(root: Path, name: str, ft: dict, lr: float, args, seed: int, base_ckpt: Path, chat: Path, enc, val):
    """One fine-tune at one rate, with early stopping on the validation items: every `--eval-every`
    steps (and at the end) score them, keep the trainable weights of the best point, and return the
    model restored to it."""
    import torch

    from moelab.finetune.bench_task import answer_loss, exact_match
    from moelab.train import Trainer

    cfg = _train_cfg(args.steps, lr, str(chat), seed, _model_cfg(args.experts, args.top_k), **ft)
    trainer = Trainer(cfg, root / name, init_from=base_ckpt, progress=False)
    model = trainer.model
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    every = args.eval_every or args.steps
    curve: list[dict] = []
    best, best_state = None, {}
    model.train()
    for step in range(1, args.steps + 1):
        trainer.train_step()
        if step % every and step != args.steps:
            continue
        point: dict = {"step": step, "val_em": exact_match(model, enc, val), "val_loss": answer_loss(model, enc, val)}
        curve.append({"step": step, "val_em": point["val_em"]["all"], "val_loss": point["val_loss"]})
        if _better(point, best):
            best, best_state = point, {n: p.detach().clone() for n, p in trainable}
        model.train()
    with torch.no_grad():
        for n, p in trainable:
            p.copy_(best_state[n])
    model.eval()
    opt_bytes = sum(
        t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    counts = trainer.finetune.counts
    assert best is not None
    info = {
        "lr": lr,
        **best,
        "curve": curve,
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "trainable_frac": counts["trainable"] / counts["total"],
        "optimizer_bytes": opt_bytes,
        "wall_s": trainer.progress.elapsed_s,  # the optimizer steps only, not the validation passes
        "tokens_per_s": trainer.progress.tokens / max(trainer.progress.elapsed_s, 1e-9),
    }
    return model, info


def run_seed(seed: int, args, root: Path) -> dict:
    """One seed: task, base, three fine-tunes (each once per candidate lr); exact matches."""
    import torch

    from moelab.checkpoint import load_model
    from moelab.data.chat import prepare_chat
    from moelab.data.chat_template import ChatEncoder, ChatTemplate
    from moelab.finetune.bench_task import (
        answer_loss,
        exact_match,
        make_task,
        plain_exact_match,
        pretrain_ids,
        routing_changed,
        routing_ids,
    )
    from moelab.tokenizer import EOD, ByteTokenizer
    from moelab.train import Trainer
    from moelab.train.data_source import InMemorySource

    root.mkdir(parents=True)
    task = make_task(seed, args.held_out, args.val, args.train_items, args.known_train)
    tmpl = ChatTemplate()
    tok = ByteTokenizer([EOD, *tmpl.specials])
    enc = ChatEncoder(tok, tmpl)
    tok_dir = root / "tokenizer"
    tok.save(tok_dir)
    tmpl.save(tok_dir)
    ids = torch.tensor(pretrain_ids(task, enc, random.Random(seed), args.repeats, args.chat_in_base))
    # the trainer wants a val split; its loss is not used here, so it is a copy of the stream's end
    src = InMemorySource(ids, ids[-2000:], 63, 16, tok.vocab_size, seed=seed)
    t0 = time.perf_counter()
    base_cfg = _train_cfg(args.base_steps, 3e-3, None, seed, _model_cfg(args.experts, args.top_k))
    Trainer(base_cfg, root / "base", data=src, progress=False).run()
    base_ckpt = sorted((root / "base" / "checkpoints").glob("step_*"))[-1]
    base, _, _ = load_model(base_ckpt)
    base_point = {
        "lr": None,
        "step": 0,
        "val_em": exact_match(base, enc, task.val),
        "val_loss": answer_loss(base, enc, task.val),
        "test_em": exact_match(base, enc, task.test),
        "routing_changed": 0.0,
    }
    out: dict = {
        "seed": seed,
        "base": {
            "train_s": time.perf_counter() - t0,
            "test_em": base_point["test_em"],
            "val_em": base_point["val_em"],
            "val_loss": base_point["val_loss"],
            "plain_test_em": plain_exact_match(base, tok, task.test),
        },
    }
    base_routes = routing_ids(base, enc, task.test)
    del base
    jsonl = root / "chat.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": it.question, "completion": it.answer}) + "\n" for it in task.train))
    prepare_chat([str(jsonl)], str(tok_dir), root / "chat", seq_len=63, val_fraction=0.02, quiet=True)
    lora = {"rank": 8, "alpha": 16, "targets": ["attn", "experts"]}
    variants: dict[str, tuple[dict, str]] = {
        "full": ({"mode": "all"}, args.full_lrs),
        "lora_experts": ({"mode": "lora", "lora": lora}, args.lora_lrs),
        "router_only": ({"mode": "router"}, args.router_lrs),
    }
    keys = ("lr", "step", "val_em", "val_loss", "test_em", "routing_changed", "curve")
    for name, (ft, lrs) in variants.items():
        tried = []
        for lr in _lrs(lrs, name):
            run = (root, f"{name}_{lr:g}", ft, lr, args, seed, base_ckpt, root / "chat")
            model, info = _fine_tune(*run, enc, task.val)
            info["routing_changed"] = routing_changed(base_routes, routing_ids(model, enc, task.test))
            tried.append({**info, "test_em": exact_match(model, enc, task.test)})
            del model
        # chosen on the validation items only (exact match, then answer loss on a tie), over every rate's
        # best point and the base itself (step 0): if no fine-tune beats the base on validation, the
        # variant is reported as the base
        best: dict = base_point
        for r in tried:
            best = r if _better(r, best) else best
        sizes = {k: v for k, v in tried[0].items() if k not in (*keys, "wall_s", "tokens_per_s")}
        walls = {k: tried[0][k] if best is base_point else best[k] for k in ("wall_s", "tokens_per_s")}
        out[name] = {
            **sizes,
            **walls,
            **{k: best.get(k) for k in keys if k != "curve"},
            "chosen_by": "val_em, then val_loss, over every eval point of every rate and the base (step 0)",
            "tried": [{k: r[k] for k in keys} for r in tried],
        }
    return out


def _spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarize(seeds: list[dict]) -> dict:
    """Mean and spread over seeds of each variant's test exact match, per family; paired differences
    with the base of the same seed, and on how many seeds the variant beat it."""
    fams = list(seeds[0]["base"]["test_em"])
    out: dict = {"base": {f: _spread([s["base"]["test_em"][f] for s in seeds]) for f in fams}}
    out["base_plain"] = {f: _spread([s["base"]["plain_test_em"][f] for s in seeds]) for f in fams}
    for v in VARIANTS:
        out[v] = {f: _spread([s[v]["test_em"][f] for s in seeds]) for f in fams}
        diffs = [s[v]["test_em"]["all"] - s["base"]["test_em"]["all"] for s in seeds]
        out[v]["gain_over_base"] = _spread(diffs)
        out[v]["seeds_above_base"] = sum(d > 0 for d in diffs)
        out[v]["lrs_chosen"] = [s[v]["lr"] for s in seeds]
        out[v]["steps_chosen"] = [s[v]["step"] for s in seeds]
        out[v]["routing_changed"] = _spread([s[v]["routing_changed"] for s in seeds])
    return out


def _print(summary: dict, seeds: list[dict]) -> None:
    fams = [f for f in summary["base"] if f != "all"]
    head = f"{'variant':14s} " + " ".join(f"{f:>13s}" for f in [*fams, "all"]) + "  seeds>base"
    print(f"test exact match, mean +- std over {len(seeds)} seed(s)")
    print(head)
    for v in ("base_plain", "base", *VARIANTS):
        cells = " ".join(f"{summary[v][f]['mean']:6.1%} +-{summary[v][f]['std']:5.1%}" for f in [*fams, "all"])
        above = f"  {summary[v]['seeds_above_base']}/{len(seeds)}" if v in VARIANTS else ""
        print(f"{v:14s} {cells}{above}")
    print("(base_plain: the base asked the same questions as prose, not in the chat template)")
    s0 = seeds[0]
    head = f"{'variant':14s} {'trainable':>10s} {'frac':>7s} {'opt MB':>8s} {'wall s':>7s} {'tok/s':>8s}"
    print(f"{head} {'routing chg':>11s}  lr@step chosen per seed  (sizes and times: seed {s0['seed']})")
    for v in VARIANTS:
        r, sv = s0[v], summary[v]
        points = zip(sv["lrs_chosen"], sv["steps_chosen"], strict=True)
        chosen = ", ".join("base" if lr is None else f"{lr:g}@{st}" for lr, st in points)
        print(
            f"{v:14s} {r['trainable_params']:10,d} {r['trainable_frac']:7.2%} {r['optimizer_bytes'] / 1e6:8.2f} "
            f"{r['wall_s']:7.1f} {r['tokens_per_s']:8,.0f} {sv['routing_changed']['mean']:11.1%}  {chosen}"
        )
    print("(routing chg: share of test-prompt routing decisions, token x layer, that differ from the base's)")


def run(args) -> int:
    if args.memory:
        from moelab.finetune.bench_memory import run_memory

        return run_memory(args)
    import torch

    from moelab.errors import UserError

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise UserError(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if args.steps < 1:
        raise UserError(f"--steps: expected >= 1, got {args.steps}")
    if args.experts < 1 or EXPERT_WIDTH % args.experts or not 1 <= args.top_k <= args.experts:
        raise UserError(
            f"--experts/--top-k: expected a divisor of {EXPERT_WIDTH} and 1 <= top-k <= experts, "
            f"got {args.experts} and {args.top_k}"
        )
    if args.eval_every < 0:
        raise UserError(f"--eval-every: expected >= 0 (0 = only at the end), got {args.eval_every}")
    for v in VARIANTS:  # bad input fails before any training
        _lrs(getattr(args, v.split("_")[0] + "_lrs"), v)
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="moelab-bench-ft-"))
    t0 = time.perf_counter()
    per_seed = []
    try:
        for seed in seeds:
            per_seed.append(run_seed(seed, args, root / f"seed{seed}"))
            em = per_seed[-1]
            print(f"seed {seed}: " + ", ".join(f"{v} {em[v]['test_em']['all']:.1%}" for v in ("base", *VARIANTS)))
    finally:  # runs and checkpoints of every fine-tune: ~10 MB each
        shutil.rmtree(root, ignore_errors=True)
    summary = summarize(per_seed)
    settings = {
        k: getattr(args, k)
        for k in (
            "steps",
            "base_steps",
            "held_out",
            "val",
            "train_items",
            "known_train",
            "repeats",
            "chat_in_base",
            "full_lrs",
            "lora_lrs",
            "router_lrs",
            "eval_every",
            "experts",
            "top_k",
            "threads",
        )
    }
    result = {
        "settings": {**settings, "seeds": seeds, "model": _model_cfg(args.experts, args.top_k)},
        "summary": summary,
        "seeds": per_seed,
        "total_s": time.perf_counter() - t0,
    }
    out = Path(args.out or "benchmarks/finetune.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    _print(summary, per_seed)
    print(f"wrote {out}")
    return 0
