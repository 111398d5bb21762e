"""`moelab bench dynamic`: each dynamic / structured MoE feature against the fixed top-2 baseline at an
equal training budget (same steps, batch, LR schedule, seed) on a multi-domain corpus generated here.

Corpus (byte tokens, so bits per byte are exact): five clearly different synthetic domains, one
`prepare` input each (so the input is the task id of multi-task routing): arithmetic (`37+58=95`),
code-like text, English-like prose from a small grammar, a CJK domain (3-byte UTF-8 characters) and
structured JSON records. Per variant: val bits/byte, mean experts per token (overall and per domain),
training FLOPs (the measured mean k for adaptive routers), specialisation I(domain; expert) against its
shuffled chance level (and I(domain; group) for the hierarchical router), dead experts, tokens/s, and
the mean |cos| between experts' outputs on the same held-out tokens (what the diversity loss targets).
Growing reports the val loss right before and after doubling 8 -> 16 experts. Fixed top-1 and top-4
runs are references: their per-domain loss difference says where more active experts pay, which is
what "harder" means for adaptive k (dynamic_summary.py).

Paired seeds (`--seeds 0 1 2`): every variant runs with each training seed, and a seed fixes the data
order (the window sampler has its own generator) and the initialisation of every parameter the
architectures share, so the grown run is the 8-expert run step for step until `--grow-at` (checked:
`paired_identical_until`). Claims are made on the paired differences variant - top2 at the same seed:
their mean, spread and a paired t statistic (moelab/bench/dynamic_summary.py).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

DOMAINS = ("arithmetic", "code", "prose", "cjk", "records")
VARIANTS = (
    "top2",
    "top1",
    "top4",
    "top_p",
    "null",
    "grow",
    "grow_rnoise",
    "grow_split",
    "grow_diversity",
    "hierarchical",
    "diversity",
    "multitask",
)


def add_arguments(p):
    p.add_argument("--steps", type=int, default=500, help="optimizer steps per variant (default 500)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared CPU's neighbours)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=VARIANTS,
        metavar="VARIANT",
        help=f"which to run (default all: {', '.join(VARIANTS)}); top1 and top4 are fixed-k references "
        "whose per-domain loss gap says where more experts pay, the yardstick for adaptive k by domain",
    )
    p.add_argument("--work-dir", default="benchmarks/dynamic-work", help="corpus, dataset and runs")
    p.add_argument("--json", dest="json_out", default="benchmarks/dynamic.json")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="training seeds; every variant runs with each (paired: same data order and shared init)",
    )
    p.add_argument("--grow-at", type=int, default=None, help="step at which grow variants double (default steps/2)")
    p.add_argument(
        "--grow-router-noise",
        type=float,
        default=0.1,
        help="router-row offsets of the grow_rnoise variant, relative to their std (default 0.1)",
    )
    p.add_argument(
        "--grow-split-noise",
        type=float,
        default=0.3,
        help="opposite noise on the split halves' expert weights of the grow_split variant, relative to "
        "each tensor's std (default 0.3)",
    )


def _doc(domain: str, rng: random.Random) -> str:
    lines = []
    for _ in range(40):
        if domain == "arithmetic":
            a, b = rng.randrange(100), rng.randrange(100)
            op = rng.choice("+-*")
            lines.append(f"{a}{op}{b}={eval(f'{a}{op}{b}')}")  # noqa: S307 (our own digits)
        elif domain == "code":
            f, v, n = rng.choice(["add", "scale", "norm", "load"]), rng.choice("xyzw"), rng.randrange(10)
            lines.append(f"def {f}_{n}({v}):\n    return {v} * {n} + {rng.randrange(9)}")
        elif domain == "prose":
            subj = rng.choice(["the old man", "a small bird", "my sister", "the river", "every child"])
            verb = rng.choice(["walked to", "looked at", "sang about", "forgot", "dreamed of"])
            obj = rng.choice(["the quiet hill", "a green door", "the morning sea", "her lost letter"])
            lines.append(f"{subj.capitalize()} {verb} {obj}, and the day went on.")
        elif domain == "cjk":
            chars = "山水日月人心天地风花雪夜春秋海云"
            lines.append("".join(rng.choice(chars) for _ in range(rng.randrange(6, 14))) + "。")
        else:
            lines.append(
                json.dumps(
                    {
                        "id": rng.randrange(10000),
                        "name": rng.choice(["ana", "bo", "cy", "dee"]),
                        "age": rng.randrange(18, 90),
                        "ok": rng.random() < 0.5,
                    }
                )
            )
    return "\n".join(lines) + "\n"


def make_corpus(root: Path, seed: int, docs: int = 60) -> list[Path]:
    rng = random.Random(seed)
    dirs = []
    for d in DOMAINS:
        (root / d).mkdir(parents=True, exist_ok=True)
        for i in range(docs):
            (root / d / f"{d}_{i:03d}.txt").write_text(_doc(d, rng), encoding="utf-8")
        dirs.append(root / d)
    return dirs


def base_config(data_dir: Path, steps: int, seed: int) -> dict:
    return {
        "model": {
            "vocab_size": 264,
            "d_model": 64,
            "n_layers": 2,
            "n_heads": 4,
            "ffn_dim": 128,
            "max_seq_len": 64,
            "moe": {"num_experts": 8, "top_k": 2, "expert_dim": 64},
        },
        "data": {"path": str(data_dir), "seq_len": 64},
        "train": {
            "steps": steps,
            "batch_size": 8,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 20,
            "seed": seed,
            "peak_flops": 0,  # no MFU: not what this bench compares
        },
        "eval": {"every": 0, "batches": 128},  # caps above the val split (~88 batches): the whole split
        "checkpoint": {"every": 0, "keep_last": 1, "keep_best": False},
        "log": {"every": 10, "progress": False, "tensorboard": False},
    }


def variant_overrides(
    name: str, steps: int, grow_at: int | None = None, router_noise: float = 0.1, split_noise: float = 0.3
) -> dict:
    grow: dict = {"grow_at": [grow_at or steps // 2], "grow_anneal_steps": max(1, steps // 10)}
    table: dict[str, dict] = {
        "top2": {},
        # fixed-k references: the per-domain loss gain of top-4 over top-1 is how much more active
        # experts pay on each domain -- the difficulty adaptive k is judged against (dynamic_summary.py)
        "top1": {"model": {"moe": {"top_k": 1}}},
        "top4": {"model": {"moe": {"top_k": 4}}},
        "top_p": {"model": {"moe": {"router": "top_p", "top_k": 4, "top_p": 0.5}}},
        # null target (1 + 3) / 2 = 2 real experts per token: the FLOPs of top-2, spent adaptively
        "null": {"model": {"moe": {"top_k": 3, "num_null_experts": 4}}},
        "grow": {"schedule": grow},
        "grow_rnoise": {"schedule": {**grow, "grow_router_noise": router_noise}},
        "grow_split": {"schedule": {**grow, "grow_split_noise": split_noise}},
        "grow_diversity": {"schedule": grow, "model": {"moe": {"diversity_coef": 1.0}}},
        "hierarchical": {
            "model": {"moe": {"router": "hierarchical", "num_groups": 4, "top_groups": 2, "group_balance_coef": 0.01}}
        },
        "diversity": {"model": {"moe": {"diversity_coef": 1.0}}},
        "multitask": {"model": {"moe": {"num_tasks": len(DOMAINS), "task_balance_coef": 0.01}}},
    }
    return table[name]


def _merge(a: dict, b: dict) -> dict:
    out = json.loads(json.dumps(a))
    for k, v in b.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def measure(run_dir: Path, data_dir: Path) -> dict:
    """Routing analysis of the final model on held-out tokens, plus expert-output similarity."""
    import torch

    from moelab.analysis.collect import collect_routing
    from moelab.analysis.run import load_held_out
    from moelab.analysis.trace import summarise
    from moelab.checkpoint import load_model
    from moelab.model.dynamic_losses import expert_diversity, expert_output_similarity

    model, cfg, _ = load_model(run_dir, "cpu")
    held, _ = load_held_out(data_dir, "val", cfg.data.seq_len, 16384, "input")
    captured: dict = {}
    first = model.moe_layers[min(model.moe_layers)]
    hook = first.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach()))
    trace = collect_routing(model, held, cfg.data.seq_len, 16, "cpu")
    hook.remove()
    s = summarise(trace, None, 1)
    x = captured["x"].reshape(-1, captured["x"].shape[-1])[:512]
    layers = s["layers"]
    out = {
        "experts": cfg.model.moe.num_experts,
        "experts_per_token": sum(lay["experts_per_token"] for lay in layers) / len(layers),
        "experts_per_token_by_domain": {
            Path(d["name"]).name: sum(lay["experts_per_token_by_domain"][i] for lay in layers) / len(layers)
            for i, d in enumerate(s["domains"])
        },
        "mi_bits": sum(lay["mutual_information"] for lay in layers) / len(layers),
        "mi_chance_bits": sum(lay["mi_chance"] for lay in layers) / len(layers),
        "dead_experts": sum(len(lay["dead"]) for lay in layers),
        "expert_output_similarity": expert_output_similarity(first.experts.gate_up, first.experts.down, x),
    }
    out["mi_over_chance"] = out["mi_bits"] - out["mi_chance_bits"]
    gu, dn = first.experts.gate_up.detach(), first.experts.down.detach()
    out["weight_cos2"] = float(expert_diversity(gu, dn))  # what the diversity loss measures
    e = gu.shape[0]
    if "grow" in run_dir.name:  # the split halves: expert i and its copy i + E/2
        h = e // 2
        out["sibling_output_similarity"] = (
            sum(expert_output_similarity(gu[[i, i + h]], dn[[i, i + h]], x) for i in range(h)) / h
        )
        out["sibling_weight_cos2"] = sum(float(expert_diversity(gu[[i, i + h]], dn[[i, i + h]])) for i in range(h)) / h
    out["loss_by_domain"] = _loss_by_domain(model, held, cfg.data.seq_len, [Path(d["name"]).name for d in s["domains"]])
    if "group_mutual_information" in layers[0]:
        out["group_mi_bits"] = sum(lay["group_mutual_information"] for lay in layers) / len(layers)
        out["group_mi_chance_bits"] = sum(lay["group_mi_chance"] for lay in layers) / len(layers)
    del torch
    return out


def _loss_by_domain(model, held, seq_len: int, names: list[str]) -> dict:
    """Held-out nats per token of each domain (which domains are hard: do they get more experts?)."""
    import torch
    import torch.nn.functional as F

    n = held.tokens.numel() // seq_len * seq_len
    win, dom = held.tokens[:n].view(-1, seq_len), held.domain_ids[:n].view(-1, seq_len)
    tot, cnt = torch.zeros(len(names), dtype=torch.float64), torch.zeros(len(names), dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for b in range(0, win.shape[0], 16):
            x = win[b : b + 16]
            ce = F.cross_entropy(model(x[:, :-1]).logits.float().transpose(1, 2), x[:, 1:], reduction="none")
            d = dom[b : b + 16, 1:].reshape(-1)
            tot.index_add_(0, d, ce.reshape(-1).double())
            cnt.index_add_(0, d, torch.ones_like(d, dtype=torch.float64))
    return {name: float(t / c) if c else None for name, t, c in zip(names, tot, cnt, strict=False)}


def run(args) -> int:
    import torch

    from moelab.bench import write_results
    from moelab.bench.dynamic_summary import paired_summary
    from moelab.data.preparation import prepare
    from moelab.errors import UserError

    if args.grow_at is not None and not 0 < args.grow_at < args.steps:
        raise UserError(f"--grow-at: expected a step in (0, --steps={args.steps}), got {args.grow_at}")
    if args.grow_router_noise < 0 or args.grow_split_noise < 0:
        raise UserError(
            f"--grow-router-noise / --grow-split-noise: expected >= 0, got {args.grow_router_noise} / "
            f"{args.grow_split_noise}"
        )
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds: expected distinct seeds, got {args.seeds}")
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    data_dir = work / "data"
    if not (data_dir / "meta.json").is_file():  # one corpus (corpus seed 0) for every training seed
        dirs = make_corpus(work / "corpus", 0)
        prepare([str(d) for d in dirs], "byte", data_dir, val_fraction=0.1, workers=0, overwrite=True)
    base = base_config(data_dir, args.steps, args.seeds[0])
    base["data"]["path"] = _portable(data_dir)
    grow_at = args.grow_at or args.steps // 2
    results: dict = {
        "steps": args.steps,
        "seeds": args.seeds,
        "grow_at": grow_at,
        "config": base,
        "variants": {},
        "runs": {},
    }
    for seed in args.seeds:
        for name in args.variants:
            cfg = _merge(
                base, variant_overrides(name, args.steps, grow_at, args.grow_router_noise, args.grow_split_noise)
            )
            cfg["train"]["seed"] = seed
            cfg["data"]["path"] = str(data_dir)
            row = _run_variant(cfg, work / "runs" / f"{name}-s{seed}", data_dir)
            results["runs"].setdefault(name, {})[str(seed)] = row
            print(
                f"seed {seed} {name:>14}: bpb {row['val_bpb']:.4f}  k {row['experts_per_token']:.2f}  "
                f"MI-chance {row['mi_over_chance']:.3f}  dead {row['dead_experts']}  "
                f"sim {row['expert_output_similarity']:.3f}  {row['tokens_per_s'] or 0:,.0f} tok/s",
                flush=True,
            )
    results["variants"] = {name: results["runs"][name][str(args.seeds[0])] for name in args.variants}
    results["paired"] = paired_summary(results["runs"], args.seeds, work / "runs", grow_at)
    for name, p in results["paired"].items():
        if "delta_bpb_mean" in p:
            print(
                f"{name:>14} - top2: bpb {p['delta_bpb_mean']:+.4f} (per seed "
                + ", ".join(f"{d:+.4f}" for d in p["delta_bpb"])
                + f"; t {p['t']:+.2f}) {'beyond noise' if p['beyond_noise'] else 'within noise'}"
            )
        if "spearman_k_vs_gain" in p:
            print(
                f"{name:>14} k by domain vs gain of top-4 over top-1: Spearman {_r(p['spearman_k_vs_gain'])} "
                f"(per seed {', '.join(_r(r) for r in p['spearman_k_vs_gain_per_seed'])}): expected "
                f"direction {'met' if p['direction_met'] else 'not met'}; vs raw loss {_r(p['spearman_k_vs_loss'])}"
            )
    write_results(args.json_out, results)
    return 0


def _r(rho: float | None) -> str:
    return "n/a" if rho is None else f"{rho:+.2f}"


def _portable(path: Path) -> str:
    """A path for the committed JSON: relative to the working directory when inside it, else its name."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def _run_variant(cfg: dict, run_dir: Path, data_dir: Path) -> dict:
    from moelab.train.loop import train

    t0 = time.perf_counter()
    res = train(cfg, run_dir, progress=False, restart=True)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = recs[-1]
    tps = [r["tokens_per_s"] for r in recs if r.get("tokens_per_s")]
    row = {
        "val_bpb": last.get("val/bpb"),
        "val_loss": last.get("val/loss"),
        "train_flops": last["flops"],
        "tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None,
        "wall_s": time.perf_counter() - t0,
        "train_k_mean": [last.get(f"moe/{i}/k_mean") for i in range(cfg["model"]["n_layers"])],
        **measure(res.run_dir, data_dir),
    }
    grow = next((r for r in recs if "grow/experts" in r), None)
    if grow:
        row.update({k.split("/")[1]: v for k, v in grow.items() if k.startswith("grow/")})
    return row
