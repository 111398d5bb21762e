"""A/B for the cpu_buckets backward that skips gradients autograd does not ask for: router-only
fine-tuning steps on `small` (4 x 256 tokens, 1 thread, `bench_memory.measure`) with the current kernel
vs the one before (commit 52cb918, which computed frozen experts' weight gradients and threw them away).
Interleaved, one process per run. Usage: python benchmarks/frozen_experts_ab.py OUT.json"""

import json
import os
import subprocess
import sys
import tempfile

OLD = "52cb918"
CHILD = r"""
import sys, json, importlib.util
import moelab.kernels.cpu_buckets as cb
if sys.argv[1] == "old":
    spec = importlib.util.spec_from_file_location("old_cpu_buckets", sys.argv[2])
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    cb.grouped_swiglu = old.grouped_swiglu
from moelab.finetune.bench_memory import measure
r = measure("router_only", "small", 4, 256, 2, 1)
print(json.dumps({k: r[k] for k in ("cpu_s_per_step", "tokens_per_cpu_s", "peak_rss_bytes")}))
"""

old_src = subprocess.run(["git", "show", f"{OLD}:moelab/kernels/cpu_buckets.py"], capture_output=True, text=True)
with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
    fh.write(old_src.stdout)
res: dict = {}
for rep in range(2):
    for which in ("new", "old"):
        p = subprocess.run(
            [sys.executable, "-c", CHILD, which, fh.name],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        r = json.loads(p.stdout.strip().splitlines()[-1])
        res.setdefault(which, []).append(r)
        print(rep, which, r, flush=True)
os.unlink(fh.name)
with open(sys.argv[1], "w") as out:
    json.dump(res, out, indent=1)
