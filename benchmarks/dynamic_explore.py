"""The exploration behind benchmarks/dynamic_explore.json (issue 16: adaptive k by domain, growing
8 -> 16): extra configurations of `moelab bench dynamic`'s corpus and model, each at seeds 0 1 2,
paired with its baseline. Not part of the bench (none met its criterion); kept so the numbers in
BENCHMARKS.md can be reproduced. 1 thread, ~30 s per 1000-step run.

    PYTHONPATH=. python benchmarks/dynamic_explore.py WORK_DIR OUT.jsonl [NAME ...]

A WORK_DIR whose name ends in "facts" gets a sixth, memorisation domain (`facts_doc`: lines drawn from
a fixed 256-entry table "name lives in city, age N.", the same table in train and val) -- a domain
where capacity, not entropy, should limit the loss. Its configurations: top2, top1, top4, top_p, e16.
"""

import json
import random
import sys
import time
from pathlib import Path

import torch

from moelab.bench.dynamic import _merge, _run_variant, base_config, make_corpus
from moelab.data.preparation import prepare

GROW = {"grow_anneal_steps": 100}
CONFIGS = {  # name: (steps, overrides of base_config)
    "top2": (1000, {}),
    "top1": (1000, {"model": {"moe": {"top_k": 1}}}),
    "top4": (1000, {"model": {"moe": {"top_k": 4}}}),
    "e16": (1000, {"model": {"moe": {"num_experts": 16}}}),
    "d16_top2": (1000, {"model": {"moe": {"expert_dim": 16}}}),
    "d16_e16": (1000, {"model": {"moe": {"expert_dim": 16, "num_experts": 16}}}),
    "grow250_split0.3": (1000, {"schedule": {**GROW, "grow_at": [250], "grow_split_noise": 0.3}}),
    "grow500_split0.3": (1000, {"schedule": {**GROW, "grow_at": [500], "grow_split_noise": 0.3}}),
    "grow500_split1": (1000, {"schedule": {**GROW, "grow_at": [500], "grow_split_noise": 1.0}}),
    "top_p": (1000, {"model": {"moe": {"router": "top_p", "top_k": 4, "top_p": 0.5}}}),
    "top_p0.3": (1000, {"model": {"moe": {"router": "top_p", "top_k": 4, "top_p": 0.3}}}),
    "null_k4": (1000, {"model": {"moe": {"top_k": 4, "num_null_experts": 4, "null_k_target": 2.0}}}),
    "L_top2": (3000, {}),
    "L_e16": (3000, {"model": {"moe": {"num_experts": 16}}}),
    "L_grow1500_split0.3": (
        3000,
        {"schedule": {"grow_at": [1500], "grow_anneal_steps": 300, "grow_split_noise": 0.3}},
    ),
}


def facts_table(n: int = 256) -> list[tuple[str, str, int]]:
    r = random.Random(12345)
    syl = ["ka", "lo", "mi", "ru", "te", "vo", "zen", "pa", "shi", "dor", "el", "qua"]
    cities = ["pelim", "arvo", "tansk", "oru", "mebb", "quill", "sarn", "ivel"]
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(r.choice(syl) for _ in range(3)))
    return [(nm, r.choice(cities), r.randrange(10, 99)) for nm in sorted(names)]


def add_facts(root: Path, docs: int = 60) -> Path:
    table, rng = facts_table(), random.Random(7)
    (root / "facts").mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        lines = [f"{nm} lives in {c}, age {a}." for nm, c, a in (rng.choice(table) for _ in range(40))]
        (root / "facts" / f"facts_{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return root / "facts"


def main() -> None:
    torch.set_num_threads(1)
    work, out, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:] or list(CONFIGS)
    data_dir = work / "data"
    if not (data_dir / "meta.json").is_file():  # the bench's corpus (corpus seed 0)
        dirs = make_corpus(work / "corpus", 0)
        if work.name.endswith("facts"):
            dirs.append(add_facts(work / "corpus"))
        prepare([str(d) for d in dirs], "byte", data_dir, val_fraction=0.1, workers=0, overwrite=True)
    for seed in (0, 1, 2):
        for name in names:
            steps, ov = CONFIGS[name]
            cfg = _merge(base_config(data_dir, steps, seed), ov)
            t0 = time.time()
            row = _run_variant(cfg, work / "runs" / f"{name}-s{seed}", data_dir)
            row.update(name=name, seed=seed, steps=steps, overrides=ov)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name} seed {seed}: bpb {row['val_bpb']:.4f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
