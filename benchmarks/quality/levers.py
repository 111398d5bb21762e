"""The recipe levers of issue 19, item 2, at equal tokens on one corpus: each variant of the CPU recipe trains
with `moelab bench quality --models moe` (same data, batch, schedule, seed), the dense twin once. Writes one
JSON per variant under --out and prints final val bits/byte. Usage:

    python benchmarks/quality/levers.py --out benchmarks/quality/levers --tokens 6e5 --seeds 0 [--only NAME ...]

Round 1 (benchmarks/quality/levers/, seed 0) ran the first eight variants; round 2 (benchmarks/quality/levers2/,
seeds 0 and 1) ran `--only recipe recipe-noz recipe-capacity recipe-every2 recipe-d2s dense` and `--only e32k8
e32k8-gumbel recipe-router-lr0.1 recipe-router-lr3 recipe-router-init` side by side. BENCHMARKS.md has both.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import yaml

from moelab.bench.quality_setup import load_recipe

RECIPE = load_recipe("recipe-cpu")  # the shipped recipe: 32 x 64, top-8, aux-loss-free (sigmoid + bias)
# The first round of levers (2026-12-06) varied the recipe as it was then: softmax top-k with the Switch loss
# at 0.01. Pinned here, so that those names keep meaning what BENCHMARKS.md measured under them.
SWITCH = copy.deepcopy(RECIPE)
SWITCH["model"]["moe"].update(router="softmax_topk", router_bias=False, bias_update_rate=0.0, load_balance_coef=0.01)
ACTIVE = 512  # every variant keeps top_k * expert_dim + shared = 512 (= the dense twin's ffn_dim)


def variant(base: dict = SWITCH, train: dict | None = None, schedule: dict | None = None, **moe) -> dict:
    cfg = copy.deepcopy(base)
    m = cfg["model"]["moe"]
    m.update(num_shared_experts=0, shared_expert_dim=None)
    m.update(moe)
    cfg.setdefault("train", {}).update(train or {})
    if schedule:
        cfg.setdefault("schedule", {}).update(schedule)
    return cfg


AUXFREE = dict(router="sigmoid", router_bias=True, bias_update_rate=1e-3, load_balance_coef=0.0)
VARIANTS = {
    # round 1 (2026-12-06): granularity, shared expert, balancing; on SWITCH
    "e8k2-shared": variant(num_experts=8, top_k=2, expert_dim=128, num_shared_experts=1, shared_expert_dim=256),
    "e8k2": variant(num_experts=8, top_k=2, expert_dim=256),
    "e16k4": variant(num_experts=16, top_k=4, expert_dim=128),
    "e32k8": variant(num_experts=32, top_k=8, expert_dim=64),
    "e16k2-shared": variant(num_experts=16, top_k=2, expert_dim=128, num_shared_experts=1, shared_expert_dim=256),
    "e16k4-auxfree": variant(num_experts=16, top_k=4, expert_dim=128, **AUXFREE),
    "e32k8-auxfree": variant(num_experts=32, top_k=8, expert_dim=64, **AUXFREE),
    "e32k8-lb03": variant(num_experts=32, top_k=8, expert_dim=64, load_balance_coef=0.03),
    # round 2 (2026-12-07): the levers round 1 left, each on the shipped recipe (= e32k8-auxfree)
    "recipe": variant(RECIPE),
    "recipe-noz": variant(RECIPE, z_loss_coef=0.0),
    "recipe-capacity": variant(RECIPE, capacity_factor=1.25),
    "recipe-every2": variant(RECIPE, layers="every:2"),  # MoE in layers 1 and 3, dense SwiGLU 512 in 0 and 2
    "recipe-d2s": variant(RECIPE, schedule={"top_k_start": 16}),  # dense-to-sparse: k 16 -> 8 over half the run
    "recipe-router-lr0.1": variant(RECIPE, train={"router_lr_scale": 0.1}),
    "recipe-router-lr3": variant(RECIPE, train={"router_lr_scale": 3.0}),
    "recipe-router-init": variant(RECIPE, router_init_std=0.002),
    # Gumbel routing has no selection bias: compared with e32k8 (softmax + Switch loss), tau 1 -> 0.1
    "e32k8-gumbel": variant(num_experts=32, top_k=8, expert_dim=64, router="gumbel", schedule={"gumbel_tau_end": 0.1}),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", type=float, default=6e5)
    p.add_argument("--seeds", nargs="+", default=["0"])
    p.add_argument("--corpus", default="shakespeare")
    p.add_argument("--only", nargs="+", choices=[*VARIANTS, "dense"])
    p.add_argument("--work-dir", default="benchmarks/quality-work")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or [*VARIANTS, "dense"]:
        recipe = args.out / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump(VARIANTS.get(name, VARIANTS["recipe"])))
        models = ["dense"] if name == "dense" else ["moe"]
        cmd = [sys.executable, "-m", "moelab", "bench", "quality", "--recipe", str(recipe), "--models", *models]
        cmd += ["--corpora", args.corpus, "--tokens", str(args.tokens), "--seeds", *args.seeds, "--threads", "1"]
        cmd += [
            "--work-dir",
            args.work_dir,
            "--json",
            str(args.out / f"{name}.json"),
            "--plot",
            str(args.out / f"{name}.png"),
        ]
        subprocess.run(cmd, check=True)
        runs = json.loads((args.out / f"{name}.json").read_text())["runs"]
        print(name, [round(r["final_bpb"], 4) for r in runs], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
