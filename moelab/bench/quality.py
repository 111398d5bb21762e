"""`moelab bench quality`: does the MoE pay? Validation bits per byte of the shipped MoE recipe, its dense twin
of equal active parameters and transformers' model of the same shape, on several corpora, several seeds, with
each model's learning rate picked by the same small sweep, for an equal wall-clock budget (`--minutes`) or an
equal number of training tokens (`--tokens`). Corpora and models: `moelab.bench.quality_setup`.

Fairness: every model gets the same data, batch, sequence length, schedule shape, seed and budget. With
`--minutes`, each run is budgeted in seconds of training (`train.budget_seconds`: its LR schedule decays over
the time, whatever speed the machine gives it, and it stops when the time is spent); a short probe of each
model's step time sets the evaluation cadence only. `--concurrent` trains the
models of one (corpus, seed) side by side, one thread each, so that a shared machine's load falls on all of them
alike; without it they run one after the other with `--threads` each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from moelab.bench.quality_setup import CORPORA, DEFAULT_RECIPE

MODELS = ("moe", "dense", "hf")


def add_arguments(p):
    p.add_argument(
        "--corpora",
        nargs="+",
        default=list(CORPORA),
        metavar="NAME",
        help=f"corpora: {', '.join(CORPORA)} or file:PATH (default: all three)",
    )
    p.add_argument("--data", help="a text file to use as the only corpus (byte tokens); same as --corpora file:PATH")
    p.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help=f"the MoE: a preset name or a YAML config (default {DEFAULT_RECIPE}); the dense twin is derived from it",
    )
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds (default 0 1)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="equal wall-clock budget per run (default 5)")
    budget.add_argument("--tokens", type=float, help="equal training tokens per run instead of equal time")
    p.add_argument(
        "--lrs",
        nargs="+",
        type=float,
        default=[],
        metavar="LR",
        help="learning-rate sweep: each model trains --sweep-tokens at each LR on the first corpus (seed 0) and "
        "keeps the LR with the lowest final val bits/byte (default: no sweep, the recipe's train.lr)",
    )
    p.add_argument("--sweep-tokens", type=float, default=5e5, help="tokens per sweep run (default 500000)")
    p.add_argument(
        "--sweep-from",
        metavar="JSON",
        help="take each model's LR from the sweep recorded in an earlier study's JSON (same recipe, first corpus, "
        "dtype and overrides) instead of sweeping again",
    )
    p.add_argument("--evals", type=int, default=15, help="validation points per curve (default 15)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every model, e.g. --set train.batch_size=16",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads per run (default: torch's choice; 1 with --concurrent)"
    )
    p.add_argument(
        "--concurrent",
        action="store_true",
        help="train the models of one corpus and seed at the same time, one thread each, so that load on a shared "
        "machine hits them alike; default: one after the other, each with the whole machine",
    )
    p.add_argument("--work-dir", default="benchmarks/quality-work", help="datasets and run directories")
    p.add_argument("--json", dest="json_out", default="benchmarks/quality.json")
    p.add_argument("--plot", default="benchmarks/quality.png")


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
            raise RuntimeError(f"{' '.join(cmd[:5])} failed:\n{err[-3000:]}")
        outs.append(out)
    return outs


def _worker(spec: dict) -> list[str]:
    return [sys.executable, "-m", "moelab.bench.train_worker", json.dumps(spec)]


class Study:
    """Runs one batch of (model, config) training jobs at a time and turns their logs into result rows."""

    def __init__(self, args):
        self.args, self.work = args, Path(args.work_dir)
        self.threads = args.threads or (1 if args.concurrent else None)
        self.env = {**os.environ, **({"OMP_NUM_THREADS": str(self.threads)} if self.threads else {})}
        self.count = 0

    def probe(self, cfgs: dict[str, dict]) -> dict[str, float]:
        """Seconds per optimizer step of each model (median of 4 after 2 warm-ups, in its own process)."""
        specs = [
            {"impl": "hf" if w == "hf" else "moelab", "steps": 4, "warmup": 2, "threads": self.threads, "config": c}
            for w, c in cfgs.items()
        ]
        outs = _run_all([_worker(s) for s in specs], self.env, self.args.concurrent)
        return {w: json.loads(o.strip().splitlines()[-1])["step_s"] for w, o in zip(cfgs, outs, strict=True)}

    def train(self, cfgs: dict[str, dict], steps: dict[str, int], budget_s: float | None = None) -> dict[str, dict]:
        """Train each model for its step count, or for `budget_s` seconds of training (train.budget_seconds:
        the LR schedule runs over the time; `steps` is then the expected count, which sets the eval cadence,
        and the cap is three times it); {model: {"curve", "impl", "health"}}."""
        import yaml

        cmds, dirs = [], {}
        for which, cfg in cfgs.items():
            cfg = json.loads(json.dumps(cfg))
            every = max(1, steps[which] // self.args.evals)
            cap = steps[which] if budget_s is None else 3 * steps[which]
            cfg["train"].update(steps=cap, budget_seconds=budget_s)
            cfg.setdefault("eval", {})["every"] = every
            cfg["log"]["every"] = every
            if which == "hf":
                spec = {"task": "quality_hf", "config": cfg, "eval_every": every}
                cmds.append(_worker({**spec, "threads": self.threads}))
                continue
            self.count += 1
            run_dir = self.work / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{self.count:03d}-{which}"
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            cfg_file = run_dir.with_suffix(".yaml")
            cfg_file.write_text(yaml.safe_dump(cfg))
            dirs[which] = run_dir
            cmds.append([sys.executable, "-m", "moelab", "train", str(cfg_file), "--run-dir", str(run_dir)])
            cmds[-1].append("--no-progress")
        outs = _run_all(cmds, self.env, self.args.concurrent)
        return {w: self._result(w, out, dirs.get(w)) for w, out in zip(cfgs, outs, strict=True)}

    @staticmethod
    def _result(which: str, out: str, run_dir: Path | None) -> dict:
        from moelab.bench.quality_setup import routing_health

        if which == "hf":
            res = json.loads(out.strip().splitlines()[-1])
            return {"curve": res["curve"], "impl": res["impl"], "health": {}}
        recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        keys = ("step", "elapsed_s", "tokens", "val/loss", "val/bpb")
        curve = [{k: r[k] for k in keys} for r in recs if "val/bpb" in r]
        impl = f"moelab {'dense' if which == 'dense' else 'MoE'}"
        return {"curve": curve, "impl": impl, "health": routing_health(recs), "run_dir": str(run_dir)}


def earlier_sweep(args, corpus: str) -> list[dict]:
    """The sweep rows of an earlier study's JSON (`--sweep-from`), checked to be a sweep of this study: same
    recipe, corpus, dtype and overrides, and a finished run for every model compared."""
    from moelab.errors import UserError

    path = Path(args.sweep_from)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--sweep-from {path}: cannot read a study JSON ({e})") from None
    if not isinstance(old, dict) or not old.get("sweep"):
        raise UserError(f"--sweep-from {path}: no LR sweep recorded (field 'sweep' is empty or missing)")
    rows = old["sweep"]
    if not isinstance(rows, list) or not all(
        isinstance(s, dict) and {"model", "lr", "final_bpb"} <= s.keys() for s in rows
    ):
        raise UserError(f"--sweep-from {path}: field 'sweep': expected a list of {{model, lr, final_bpb}} records")
    # a JSON from before "overrides" and "sweep_corpus" were written swept its first corpus without overrides
    for field, got, want in (
        ("recipe", old.get("recipe"), args.recipe),
        ("dtype", old.get("dtype"), args.dtype),
        ("overrides", old.get("overrides", []), args.overrides),
        ("sweep_corpus", old.get("sweep_corpus", (old.get("corpora") or [None])[0]), corpus),
    ):
        if got != want:
            raise UserError(f"--sweep-from {path}: field '{field}' is {got!r}, this study has {want!r}")
    for w in args.models:
        if not any(s["model"] == w and s["final_bpb"] is not None for s in rows):
            raise UserError(f"--sweep-from {path}: no finished sweep run for model '{w}'")
    return [s for s in rows if s["model"] in args.models]


def _steps_for_tokens(cfg: dict, tokens: float) -> int:
    per_step = cfg["train"]["batch_size"] * cfg["data"]["seq_len"] * cfg["train"].get("grad_accum", 1)
    return max(20, round(tokens / per_step))


def run(args) -> int:
    from moelab.bench.quality_setup import load_recipe, model_configs, plot, prepare_corpus, summarise
    from moelab.config import Config, apply_overrides, from_dict
    from moelab.data import load_meta
    from moelab.errors import UserError
    from moelab.model.counting import count_params

    for flag in ("minutes", "tokens", "sweep_tokens"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag.replace('_', '-')}: expected > 0, got {value:g}")
    if args.sweep_from and args.lrs:
        raise UserError("--sweep-from and --lrs: give one (an earlier sweep's LRs, or a new sweep)")
    corpora = [f"file:{args.data}"] if args.data else args.corpora
    if args.tokens:
        budget = {"kind": "tokens", "value": args.tokens}
    else:
        budget = {"kind": "minutes", "value": args.minutes or 5.0}
    recipe = load_recipe(args.recipe)
    recipe.setdefault("train", {})["dtype"] = args.dtype
    study = Study(args)
    results: dict = {
        "recipe": args.recipe,
        "corpora": corpora,
        "budget": budget,
        "dtype": args.dtype,
        "concurrent": args.concurrent,
        "threads": study.threads,
        "seeds": args.seeds,
        "overrides": args.overrides,
        "sweep_corpus": corpora[0],
        "lr": {},
        "sweep": [],
        "runs": [],
    }
    prepared = {c: prepare_corpus(c, study.work) for c in corpora}
    configs = {}
    for c, d in prepared.items():
        base = model_configs(recipe, d, load_meta(d)["tokenizer"]["vocab_size"])
        configs[c] = {w: apply_overrides(base[w], args.overrides) for w in args.models}
    for c in corpora:  # validate every config up front: a typo must not surface an hour into the study
        for cfg in configs[c].values():
            from_dict(Config, cfg)

    # The LR sweep: same token budget for every model and LR, first corpus, seed 0.
    lrs = {w: configs[corpora[0]][w]["train"].get("lr") for w in args.models}
    if args.sweep_from:
        results["sweep"], results["sweep_from"] = earlier_sweep(args, corpora[0]), args.sweep_from
    elif args.lrs:
        sweep_cfgs = configs[corpora[0]]
        for lr in args.lrs:
            cfgs = {w: _with(c, lr=lr, seed=0) for w, c in sweep_cfgs.items()}
            steps = {w: _steps_for_tokens(c, args.sweep_tokens) for w, c in cfgs.items()}
            for w, r in study.train(cfgs, steps).items():
                final = r["curve"][-1]["val/bpb"] if r["curve"] else None
                results["sweep"].append({"model": w, "lr": lr, "final_bpb": final, "steps": steps[w]})
                print(f"[sweep {corpora[0]}] {w:5s} lr {lr:g}: final val bpb {final}", flush=True)
    if results["sweep"]:
        for w in args.models:
            done = [s for s in results["sweep"] if s["model"] == w and s["final_bpb"] is not None]
            lrs[w] = min(done, key=lambda s: s["final_bpb"])["lr"]
    results["lr"] = lrs

    for c in corpora:
        for seed in args.seeds:
            cfgs = {w: _with(configs[c][w], lr=lrs[w], seed=seed) for w in args.models}
            if budget["kind"] == "tokens":
                steps = {w: _steps_for_tokens(cfg, budget["value"]) for w, cfg in cfgs.items()}
                budget_s = None
            else:
                budget_s = budget["value"] * 60
                step_s = study.probe(cfgs)  # the expected step counts set the eval cadence only
                steps = {w: max(20, int(budget_s / s)) for w, s in step_s.items()}
            for w, r in study.train(cfgs, steps, budget_s).items():
                from moelab.bench.quality_setup import curve_stats

                pc = count_params(from_dict(Config, cfgs[w]).model)
                row = {"corpus": c, "model": w, "seed": seed, "lr": lrs[w], "steps_planned": steps[w]}
                row.update(impl=r["impl"], params_active=pc.active, params_total=pc.total, **curve_stats(r["curve"]))
                row.update(health=r["health"], curve=r["curve"], run_dir=r.get("run_dir"))
                results["runs"].append(row)
                print(
                    f"[{c} seed {seed}] {w:5s} final val bpb {row['final_bpb']:.4f} after {row['steps_done']} "
                    f"steps ({row['tokens'] / 1e6:.2f}M tokens)",
                    flush=True,
                )
            _write(results, args)  # after every (corpus, seed): a long study is never lost whole
    results["summary"] = summarise(results["runs"])
    _write(results, args)
    plot(results, Path(args.plot))
    for c, s in results["summary"].items():
        line = ", ".join(f"{m} {v['mean']:.4f} [{v['min']:.4f}, {v['max']:.4f}]" for m, v in s["models"].items())
        diff = s.get("moe_minus_dense")
        extra = f"; MoE - dense {diff['mean']:+.4f} (n={diff['n']})" if diff else ""
        print(f"{c}: {line}{extra}")
    print(f"wrote {args.json_out} and {args.plot}")
    return 0


def _with(cfg: dict, *, lr: float | None, seed: int) -> dict:
    out = json.loads(json.dumps(cfg))
    if lr is not None:
        ratio = out["train"].get("min_lr", lr / 10) / out["train"].get("lr", lr)
        out["train"].update(lr=lr, min_lr=lr * ratio)  # the schedule's shape is kept
    out["train"]["seed"] = seed
    return out


def _write(results: dict, args) -> None:
    from moelab.fileio import write_file_atomic

    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out, json.dumps(results, indent=1))
