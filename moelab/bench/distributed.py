"""`moelab bench distributed`: training tokens/s on 1 process and on 2 processes (dp=2, ep=2) on CPU.

Every variant trains the same model on the same global batches (random tokens; throughput does not
depend on them) through `init_parallel` + `parallelize`, launched by `torchrun --standalone`. The
cores are shared fairly: one process gets all `--threads`, two processes get half each. Variants are
interleaved within each repeat; medians over the timed steps of each run are reported. On a 2-core
machine little speed-up is expected: the point of multi-process on CPU is correctness (gloo runs the
same code as NCCL), and the ratio shows what the collectives cost. Two processes use one thread each;
one process is timed with one thread and with two (the same cores as two processes).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moelab.bench import write_results

# name -> (processes, parallel section, threads per process)
VARIANTS = {"1proc-1t": (1, {}, 1), "1proc-2t": (1, {}, 2), "dp2": (2, {"dp": 2}, 1), "ep2": (2, {"ep": 2}, 1)}


def add_arguments(p):
    p.add_argument("--config", default="configs/tiny.yaml", help="model config (default configs/tiny.yaml)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch in sequences (default 8)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run, after 2 warm-up steps")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every variant")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--json", dest="json_out", default="benchmarks/distributed.json", help="where to write results")


def worker(config: str, overrides: list[str], batch_size: int, seq_len: int, steps: int, out: str) -> None:
    """One rank of a timed run (called under torchrun)."""
    import torch

    from moelab.config import load_config
    from moelab.model import Transformer
    from moelab.parallel import clip_grad_norm_, init_parallel, parallelize
    from moelab.train.optim import build_optimizer

    cfg = load_config(config, [*overrides, f"data.seq_len={seq_len}", f"train.batch_size={batch_size}"])
    ctx = init_parallel(cfg.parallel, cfg.model)
    torch.manual_seed(cfg.train.seed)
    model = parallelize(Transformer(cfg.model), ctx)
    opt = build_optimizer(model, cfg.train)
    rows = ctx.local_batch(batch_size)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 2):
        tokens = torch.randint(0, cfg.model.vocab_size, (batch_size, seq_len + 1), generator=gen)
        ctx.barrier()
        t0 = time.perf_counter()
        out_ = model(tokens[rows, :-1], tokens[rows, 1:])
        out_.loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = ctx.mean(out_.loss.detach())  # a collective: every rank has finished the step
        if step >= 2:
            times.append(time.perf_counter() - t0)
    if ctx.is_main:
        Path(out).write_text(json.dumps({"step_seconds": times, "loss": loss, "world": ctx.world_size}))
    ctx.close()


def _launch(nproc: int, parallel: dict, args, threads: int, out: Path) -> dict:
    overrides = [f"parallel.{k}={v}" for k, v in parallel.items()]
    code = "import sys, json; from moelab.bench.distributed import worker; worker(*json.loads(sys.argv[1]))"
    payload = json.dumps([args.config, overrides, args.batch_size, args.seq_len, args.steps, str(out)])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "--no-python",
        sys.executable,
        "-c",
        code,
        payload,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{nproc} process run failed:\n{res.stderr[-3000:]}")
    return json.loads(out.read_text())


def run(args) -> int:
    tokens = args.batch_size * args.seq_len
    samples: dict[str, list[float]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name in args.variants:
                nproc, parallel, threads = VARIANTS[name]
                res = _launch(nproc, parallel, args, threads, Path(tmp) / f"{name}.json")
                samples[name].extend(res["step_seconds"])
            print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
    med = {name: statistics.median(s) for name, s in samples.items()}
    result = {
        "config": {
            "model": args.config,
            "global_batch": args.batch_size,
            "seq_len": args.seq_len,
            "timed_steps_per_run": args.steps,
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
            "variants": {
                n: {"processes": v[0], "parallel": v[1], "threads_per_process": v[2]}
                for n, v in VARIANTS.items()
                if n in args.variants
            },
        },
        "median_step_s": med,
        "tokens_per_s": {name: tokens / m for name, m in med.items()},
        "speedup_vs_1proc_1t": {name: med["1proc-1t"] / m for name, m in med.items()} if "1proc-1t" in med else {},
        "samples": samples,
    }
    print(f"\n{'variant':8s} {'step s':>8s} {'tokens/s':>10s} {'vs 1proc-1t':>12s}")
    for name in args.variants:
        sp = result["speedup_vs_1proc_1t"].get(name)
        ratio = "-" if sp is None else f"{sp:.2f}x"
        print(f"{name:8s} {med[name]:8.3f} {result['tokens_per_s'][name]:10.0f} {ratio:>12}")
    write_results(args.json_out, result)
    return 0
