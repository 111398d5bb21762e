"""`moelab bench finetune`: full vs LoRA-on-experts vs router-only instruction tuning of one small base.

The task is generated here (no downloads): templated questions over arithmetic ("What is 17+25?"),
string reversal ("Reverse the word: kelp") and a built-in facts table ("What is the capital of Peru?").
The base is pre-trained demo-style on plain-text statements of the same knowledge ("17+25=42.") plus a
few conversations in the chat template, so it knows facts and format only loosely; each fine-tune then
trains on the chat data (loss on assistant tokens only). Reported per variant: held-out exact match
(greedy, on questions never trained on; facts are asked with a phrasing never trained on), trainable
parameters, optimizer state bytes, wall time and tokens/s.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

FACTS = {
    "France": "Paris",
    "Peru": "Lima",
    "Japan": "Tokyo",
    "Kenya": "Nairobi",
    "Chile": "Santiago",
    "Egypt": "Cairo",
    "Spain": "Madrid",
    "Cuba": "Havana",
    "Iran": "Tehran",
    "Mali": "Bamako",
    "Nepal": "Kathmandu",
    "Oman": "Muscat",
    "Italy": "Rome",
    "Laos": "Vientiane",
    "Fiji": "Suva",
    "Chad": "Ndjamena",
    "Togo": "Lome",
    "Iraq": "Baghdad",
    "Norway": "Oslo",
}
WORDS = [
    "kelp",
    "moss",
    "fern",
    "reed",
    "lily",
    "palm",
    "sage",
    "rose",
    "iris",
    "mint",
    "dill",
    "leek",
    "kale",
    "corn",
    "bean",
    "pear",
    "plum",
    "lime",
    "date",
    "fig",
    "yam",
    "oat",
    "rye",
    "hop",
    "ivy",
    "oak",
    "elm",
    "ash",
    "fir",
    "yew",
]


def add_arguments(p) -> None:
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per fine-tune (default 150)")
    p.add_argument("--base-steps", type=int, default=300, help="pre-training steps of the base (default 300)")
    p.add_argument("--out", default="benchmarks/results/finetune.json", help="JSON results file")
    p.add_argument("--seed", type=int, default=0)


def examples(rng: random.Random, n: int, held_out: bool) -> list[tuple[str, str, str]]:
    """(kind, question, answer). Held-out arithmetic and reversal use operands / words the training
    split never asks about; held-out facts use another phrasing."""
    out = []
    for i in range(n):
        kind = ("arith", "reverse", "fact")[i % 3]
        if kind == "arith":
            while True:
                a, b = rng.randint(0, 49), rng.randint(0, 49)
                if ((a + b) % 5 == 0) == held_out:
                    break
            out.append((kind, f"What is {a}+{b}?", str(a + b)))
        elif kind == "reverse":
            w = rng.choice(WORDS[:24] if not held_out else WORDS[24:])
            out.append((kind, f"Reverse the word: {w}", w[::-1]))
        else:
            country = rng.choice(list(FACTS))
            q = f"Which city is the capital of {country}?" if held_out else f"What is the capital of {country}?"
            out.append((kind, q, FACTS[country]))
    return out


def statements(rng: random.Random, n: int) -> str:
    """Plain-text knowledge for pre-training."""
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        w = rng.choice(WORDS)
        c = rng.choice(list(FACTS))
        lines += [f"{a}+{b}={a + b}.", f"{w} backwards is {w[::-1]}.", f"The capital of {c} is {FACTS[c]}."]
    rng.shuffle(lines)
    return " ".join(lines)


def _model_cfg() -> dict:
    return {
        "vocab_size": 264,
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "ffn_dim": 128,
        "max_seq_len": 64,
        "moe": {"num_experts": 8, "top_k": 2, "expert_dim": 64},
    }


def _train_cfg(steps: int, lr: float, data: str | None, **finetune) -> dict:
    return {
        "model": _model_cfg(),
        "data": {"seq_len": 63, "path": data},
        "train": {
            "steps": steps,
            "batch_size": 16,
            "lr": lr,
            "min_lr": lr / 10,
            "warmup_steps": 10,
            "weight_decay": 0.0,
            "peak_flops": 1e11,
            "seed": 0,
        },
        "eval": {"every": 0, "batches": 2},
        "checkpoint": {"every": 0, "keep_best": False},
        "log": {"every": 50, "progress": False, "tensorboard": False},
        "finetune": finetune,
    }


def exact_match(model, enc, tests) -> float:
    import torch

    model.eval()
    hits = 0
    with torch.no_grad():
        for _, q, a in tests:
            ids = enc.prompt([{"role": "user", "content": q}])
            out = []
            for _ in range(len(a) + 2):
                nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
                if nxt in enc.stop_ids:
                    break
                out.append(nxt)
            hits += enc.tok.decode(out) == a
    return hits / len(tests)


def run(args) -> int:
    import torch

    from moelab.checkpoint import load_model
    from moelab.data.chat import prepare_chat
    from moelab.data.chat_template import ChatEncoder, ChatTemplate
    from moelab.tokenizer import EOD, ByteTokenizer
    from moelab.train import Trainer
    from moelab.train.data_source import InMemorySource

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = random.Random(args.seed)
    tmpl = ChatTemplate()
    tok = ByteTokenizer([EOD, *tmpl.specials])
    enc = ChatEncoder(tok, tmpl)
    train_ex, test_ex = examples(rng, 1500, False), examples(rng, 90, True)
    root = Path(tempfile.mkdtemp(prefix="moelab-bench-ft-"))
    tok_dir = root / "tokenizer"
    tok.save(tok_dir)
    tmpl.save(tok_dir)
    # Pre-training tokens: knowledge as statements, plus a tenth of the conversations in the template.
    ids = list(tok.encode(statements(rng, 4000)))
    for _, q, a in train_ex[:150]:
        ids += enc.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}])[0] + [tok.eod_id]
    tokens = torch.tensor(ids)
    cut = int(len(tokens) * 0.95)
    src = InMemorySource(tokens[:cut], tokens[cut:], 63, 16, tok.vocab_size)
    t0 = time.perf_counter()
    Trainer(_train_cfg(args.base_steps, 3e-3, None), root / "base", data=src, progress=False).run()
    base_s = time.perf_counter() - t0
    # the in-memory source has no tokenizer to copy; the checkpoint needs one for the chat template
    base_ckpt = sorted((root / "base" / "checkpoints").glob("step_*"))[-1]
    base_model, _, _ = load_model(base_ckpt)
    results = {"base": {"exact_match": exact_match(base_model, enc, test_ex), "train_s": base_s}}
    jsonl = root / "chat.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for _, q, a in train_ex))
    prepare_chat([str(jsonl)], str(tok_dir), root / "chat", seq_len=63, val_fraction=0.05, quiet=True)
    variants = {
        "full": ({"mode": "all"}, 1e-3),
        "lora_experts": ({"mode": "lora", "lora": {"rank": 8, "alpha": 16, "targets": ["attn", "experts"]}}, 3e-3),
        "router_only": ({"mode": "router"}, 1e-2),
    }
    for name, (ft, lr) in variants.items():
        trainer = Trainer(
            _train_cfg(args.steps, lr, str(root / "chat"), **ft), root / name, init_from=base_ckpt, progress=False
        )
        t0 = time.perf_counter()
        trainer.run()
        wall = time.perf_counter() - t0
        opt_bytes = sum(
            t.numel() * t.element_size()
            for s in trainer.optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        counts = trainer.finetune.counts
        results[name] = {
            "exact_match": exact_match(trainer.model, enc, test_ex),
            "trainable_params": counts["trainable"],
            "total_params": counts["total"],
            "trainable_frac": counts["trainable"] / counts["total"],
            "optimizer_bytes": opt_bytes,
            "wall_s": wall,
            "tokens_per_s": trainer.progress.tokens / max(trainer.progress.elapsed_s, 1e-9),
        }
    full_opt = results["full"]["optimizer_bytes"]
    for name in variants:
        results[name]["optimizer_vs_full"] = results[name]["optimizer_bytes"] / full_opt
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"steps": args.steps, "base_steps": args.base_steps, "held_out": len(test_ex), "results": results}, indent=1
        )
        + "\n"
    )
    print(f"{'variant':14s} {'EM':>6s} {'trainable':>10s} {'frac':>7s} {'opt MB':>8s} {'wall s':>7s} {'tok/s':>8s}")
    print(f"{'base':14s} {results['base']['exact_match']:6.1%}")
    for name in variants:
        r = results[name]
        print(
            f"{name:14s} {r['exact_match']:6.1%} {r['trainable_params']:10,d} {r['trainable_frac']:7.2%} "
            f"{r['optimizer_bytes'] / 1e6:8.2f} {r['wall_s']:7.1f} {r['tokens_per_s']:8,.0f}"
        )
    print(f"wrote {out}")
    return 0
