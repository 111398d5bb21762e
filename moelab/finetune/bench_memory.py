"""`moelab bench finetune --memory`: what full AdamW, LoRA (rank 8 on attention + routed experts) and
router-only fine-tuning cost on a preset (default `small`), measured rather than estimated.

Each mode runs in a process of its own (so one mode's peak resident memory cannot hide another's: the
allocator keeps freed pages, and `ru_maxrss` is per process) on random token batches of a randomly
initialised model — memory and speed do not depend on the weights' values. Per mode: trainable
parameters, optimizer state bytes (summed over the tensors in `optimizer.state`), gradient bytes (summed
over `.grad` after backward), resident memory after building the model and the process's peak, and
tokens per CPU-second and per wall-second over the timed steps (after one warm-up step, which also
creates the optimizer state). Frozen parameters are checked to get no gradient and no optimizer state.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = {
    "full": {"mode": "all"},
    "lora_r8_attn_experts": {"mode": "lora", "lora": {"rank": 8, "alpha": 16, "targets": ["attn", "experts"]}},
    "router_only": {"mode": "router"},
}


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _tensor_bytes(tensors) -> int:
    import torch

    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def measure(mode: str, preset: str, batch_size: int, seq_len: int, steps: int, threads: int) -> dict:
    """One mode, in this process: build, one warm-up step, `steps` timed steps."""
    import torch

    from moelab.config import load_config
    from moelab.finetune.lora import apply_finetune, parameter_counts
    from moelab.model import Transformer
    from moelab.presets import preset_path
    from moelab.train.optim import build_optimizer

    torch.set_num_threads(threads)
    cfg = load_config(preset_path(preset), [f"data.seq_len={seq_len}", f"train.batch_size={batch_size}"])
    cfg = load_config({**cfg.to_dict(), "finetune": MODES[mode]})
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    counts = apply_finetune(model, cfg.finetune) if cfg.finetune.mode != "all" else parameter_counts(model)
    rss_model = _rss_bytes()
    opt = build_optimizer(model, cfg.train)
    gen = torch.Generator().manual_seed(0)
    grad_bytes, cpu, wall = 0, 0.0, 0.0
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for step in range(steps + 1):
        x = torch.randint(0, cfg.model.vocab_size, (batch_size, seq_len + 1), generator=gen)
        c0, w0 = time.process_time(), time.perf_counter()
        out = model(x[:, :-1], x[:, 1:], return_logits=False)
        out.loss.backward()
        grad_bytes = _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step is a warm-up (optimizer state created, kernels planned)
            cpu += time.process_time() - c0
            wall += time.perf_counter() - w0
        if step == 0:
            assert all(p.grad is None for p in frozen), "a frozen parameter got a gradient"
    state_ids = {id(p) for p in opt.state}
    assert not any(id(p) in state_ids for p in frozen), "a frozen parameter has optimizer state"
    tokens = steps * batch_size * seq_len
    return {
        "mode": mode,
        "finetune": MODES[mode],
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "trainable_frac": counts["trainable"] / counts["total"],
        "optimizer_state_bytes": _tensor_bytes(t for s in opt.state.values() for t in s.values()),
        "grad_bytes": grad_bytes,
        "rss_after_model_bytes": rss_model,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "tokens_per_cpu_s": tokens / max(cpu, 1e-9),
        "tokens_per_wall_s": tokens / max(wall, 1e-9),
        "cpu_s_per_step": cpu / steps,
    }


def run_memory(args) -> int:
    from moelab.errors import UserError
    from moelab.presets import preset_path

    preset_path(args.preset)  # an unknown preset fails here, in one line
    if args.mem_steps < 1 or args.batch_size < 1 or args.seq_len < 1:
        raise UserError("--mem-steps, --batch-size and --seq-len must be >= 1")
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for mode in MODES:
        spec = [mode, args.preset, args.batch_size, args.seq_len, args.mem_steps, args.threads]
        proc = subprocess.run(
            [sys.executable, "-m", "moelab.finetune.bench_memory", json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"bench finetune --memory: the {mode} process failed: {tail}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(
            f"{mode:22s} trainable {r['trainable_params']:12,d} ({r['trainable_frac']:6.2%})  "
            f"opt {r['optimizer_state_bytes'] / 2**20:9.1f} MiB  grad {r['grad_bytes'] / 2**20:8.1f} MiB  "
            f"peak RSS {r['peak_rss_bytes'] / 2**20:8.1f} MiB  {r['tokens_per_cpu_s']:7.1f} tok/CPU-s",
            flush=True,
        )
    full = results["full"]
    for r in results.values():
        r["optimizer_vs_full"] = r["optimizer_state_bytes"] / full["optimizer_state_bytes"]
        r["grad_vs_full"] = r["grad_bytes"] / full["grad_bytes"]
        r["peak_rss_vs_full"] = r["peak_rss_bytes"] / full["peak_rss_bytes"]
        r["tokens_per_cpu_s_vs_full"] = r["tokens_per_cpu_s"] / full["tokens_per_cpu_s"]
    lora = results["lora_r8_attn_experts"]
    targets = {
        "lora_trainable_frac_le_5pct": lora["trainable_frac"] <= 0.05,
        "lora_optimizer_le_10pct_of_full": lora["optimizer_vs_full"] <= 0.10,
    }
    settings = {k: getattr(args, k) for k in ("preset", "batch_size", "seq_len", "mem_steps", "threads")}
    out = Path(args.out or "benchmarks/finetune_memory.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "modes": results, "targets": targets}, indent=1) + "\n")
    print(
        f"LoRA trains {lora['trainable_frac']:.2%} of the parameters (target <= 5%: "
        f"{'met' if targets['lora_trainable_frac_le_5pct'] else 'NOT met'}); its optimizer state is "
        f"{lora['optimizer_vs_full']:.2%} of full's (target <= 10%: "
        f"{'met' if targets['lora_optimizer_le_10pct_of_full'] else 'NOT met'})"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # one mode, in a process of its own (run_memory starts these)
    mode, preset, batch_size, seq_len, steps, threads = json.loads(sys.argv[1])
    print(json.dumps(measure(mode, preset, batch_size, seq_len, steps, threads)))
