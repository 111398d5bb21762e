"""`moelab bench quality`: validation bits per byte for the same wall-clock budget, MoE vs dense vs
transformers' Mixtral.

Data: tinyshakespeare, byte-level tokens (bits per byte is then exact and no tokenizer is fitted to
the validation text), split by paragraph, 5% validation. Models (all trained with the same AdamW, LR
schedule, batch, sequence length and seed):
- `moe`: the tiny preset's shape (d_model 256, 4 layers, 8 experts of width 512, top-2);
- `dense`: the same with a dense SwiGLU of width 1024 = top_k x expert width (the same active parameters);
- `hf`: transformers' MixtralForCausalLM of the MoE's shape (its default expert implementation).
Each model gets the budget: its step time is measured first (a short run in its own process), the step
count is set to fill the budget (so each LR schedule completes), and the run is capped at 1.1x the
budget. Each trains in its own process: one after the other with the whole machine, or (`--concurrent`)
all at once, one thread each, so that a shared machine's load falls on all of them alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
MODELS = ("moe", "dense", "hf")


def add_arguments(p):
    p.add_argument("--data", default=str(DEFAULT_DATA), help="a text file (default ../shared/data/tinyshakespeare.txt)")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget per model (default 5)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--evals", type=int, default=15, help="validation points per curve (default 15)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every model, e.g. --set train.lr=2e-3",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads per run (default: torch's choice; 1 with --concurrent)"
    )
    p.add_argument(
        "--concurrent",
        action="store_true",
        help="train the models at the same time (each on its own thread) so load on a shared machine "
        "hits them alike; default: one after the other, each with the whole machine",
    )
    p.add_argument("--work-dir", default="benchmarks/quality-work", help="dataset and run directories")
    p.add_argument("--json", dest="json_out", default="benchmarks/quality.json")
    p.add_argument("--plot", default="benchmarks/quality.png")


def base_config(data_dir: Path, dtype: str) -> dict:
    return {
        "model": {
            "vocab_size": 264,
            "d_model": 256,
            "n_layers": 4,
            "n_heads": 8,
            "n_kv_heads": 4,
            "ffn_dim": 1024,
            "max_seq_len": 256,
            "moe": {"num_experts": 8, "top_k": 2, "expert_dim": 512, "load_balance_coef": 0.01, "z_loss_coef": 0.001},
        },
        "data": {"path": str(data_dir), "seq_len": 256},
        "train": {
            "batch_size": 8,
            "lr": 2e-3,
            "min_lr": 2e-4,
            "warmup_steps": 30,
            "dtype": dtype,
            "seed": 0,
            "peak_flops": 1.0,
        },
        "eval": {"batches": 16},
        "checkpoint": {"every": 0, "keep_last": 1, "keep_best": False},
        "log": {"progress": False},
    }


def model_config(which: str, base: dict) -> dict:
    cfg = json.loads(json.dumps(base))
    if which == "dense":
        cfg["model"]["moe"]["layers"] = "none"
    return cfg


def _run_all(cmds: list[list[str]], env: dict, concurrent: bool) -> list[str]:
    """Run commands one after the other, or all at once; return their stdout."""
    if not concurrent:
        procs = []
        for cmd in cmds:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
            procs[-1].wait()
    else:
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
    outs = []
    for cmd, proc in zip(cmds, procs, strict=True):
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{err[-3000:]}")
        outs.append(out)
    return outs


def _worker(spec: dict) -> list[str]:
    return [sys.executable, "-m", "moelab.bench.train_worker", json.dumps(spec)]


def run(args) -> int:
    import time

    import yaml

    from moelab.config import Config, apply_overrides, from_dict
    from moelab.data import prepare
    from moelab.errors import UserError
    from moelab.model.counting import count_params

    text = Path(args.data)
    if not text.is_file():
        raise UserError(f"--data {text}: no such file")
    work = Path(args.work_dir)
    data_dir = work / f"data-{text.stem}"  # one per corpus: a shared name would reuse another --data's tokens
    if not (data_dir / "meta.json").is_file():
        prepare([str(text)], "byte", data_dir, val_fraction=0.05, doc_boundary="blank", workers=0)
    base = base_config(data_dir.resolve(), args.dtype)
    budget = args.minutes * 60
    threads = args.threads or (1 if args.concurrent else None)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    results: dict = {
        "data": str(text),
        "budget_s": budget,
        "dtype": args.dtype,
        "concurrent": args.concurrent,
        "threads": threads,
        "models": {},
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfgs = {
        w: apply_overrides(model_config("dense" if w == "dense" else "moe", base), args.overrides) for w in args.models
    }
    probes = _run_all(
        [
            _worker(
                {
                    "impl": "hf" if w == "hf" else "moelab",
                    "steps": 4,
                    "warmup": 2,
                    "threads": threads,
                    "config": cfgs[w],
                }
            )
            for w in args.models
        ],
        env,
        args.concurrent,
    )
    cmds, plan = [], {}
    for which, out in zip(args.models, probes, strict=True):
        step_s = json.loads(out.strip().splitlines()[-1])["step_s"]
        steps = max(20, int(budget / step_s))
        every = max(1, steps // args.evals)
        cfg_dict = cfgs[which]
        cfg_dict["train"].update(steps=steps, max_seconds=budget * 1.1)
        cfg_dict["eval"]["every"] = every
        cfg_dict["log"]["every"] = every
        plan[which] = (step_s, steps)
        print(f"[{which}] {step_s:.2f} s/step -> {steps} steps, eval every {every}", flush=True)
        if which == "hf":
            cmds.append(
                _worker(
                    {
                        "task": "quality_hf",
                        "config": cfg_dict,
                        "eval_every": every,
                        "max_seconds": budget * 1.1,
                        "threads": threads,
                    }
                )
            )
        else:
            cfg_file = work / f"{which}-{stamp}.yaml"
            cfg_file.write_text(yaml.safe_dump(cfg_dict))
            cmds.append(
                [
                    sys.executable,
                    "-m",
                    "moelab",
                    "train",
                    str(cfg_file),
                    "--run-dir",
                    str(work / f"{which}-{stamp}"),
                    "--no-progress",
                ]
            )
    outs = _run_all(cmds, env, args.concurrent)
    for which, out in zip(args.models, outs, strict=True):
        if which == "hf":
            res = json.loads(out.strip().splitlines()[-1])
            curve, impl = res["curve"], res["impl"]
        else:
            recs = [json.loads(ln) for ln in (work / f"{which}-{stamp}" / "metrics.jsonl").read_text().splitlines()]
            curve = [
                {k: r[k] for k in ("step", "elapsed_s", "tokens", "val/loss", "val/bpb")}
                for r in recs
                if "val/bpb" in r
            ]
            impl = f"moelab ({'dense' if which == 'dense' else 'MoE'})"
        pc = count_params(from_dict(Config, cfgs[which]).model)
        results["models"][which] = {
            "impl": impl,
            "params_total": pc.total,
            "params_active": pc.active,
            "probe_step_s": plan[which][0],
            "steps_planned": plan[which][1],
            "steps_done": curve[-1]["step"] if curve else 0,
            "curve": curve,
            "final_bpb": curve[-1]["val/bpb"] if curve else None,
            "best_bpb": min(c["val/bpb"] for c in curve) if curve else None,
        }
        print(
            f"[{which}] final val bpb {results['models'][which]['final_bpb']:.4f} after "
            f"{results['models'][which]['steps_done']} steps",
            flush=True,
        )
    finals = {k: v["final_bpb"] for k, v in results["models"].items() if v["final_bpb"] is not None}
    results["winner"] = min(finals, key=finals.get) if finals else None
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)
    _plot(results, Path(args.plot))
    print(f"wrote {out} and {args.plot}; lowest final val bpb: {results['winner']}")
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in results["models"].values():
        xs = [c["elapsed_s"] / 60 for c in m["curve"]]
        ts = [c["tokens"] / 1e6 for c in m["curve"]]
        ys = [c["val/bpb"] for c in m["curve"]]
        label = f"{m['impl']} ({m['params_active'] / 1e6:.1f}M active / {m['params_total'] / 1e6:.1f}M)"
        axes[0].plot(xs, ys, marker="o", ms=3, label=label)
        axes[1].plot(ts, ys, marker="o", ms=3, label=label)
    axes[0].set_xlabel("training time (min)")
    axes[1].set_xlabel("training tokens (M)")
    for ax in axes:
        ax.set_ylabel("val bits per byte")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"{Path(results['data']).name}, byte-level, equal wall-clock budget "
        f"({results['budget_s'] / 60:.0f} min, {results['dtype']})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
