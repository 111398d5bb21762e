"""`moelab bench plan`: the memory planner's estimate next to measured peak memory of a training step.

What is measured: the peak bytes of live tensors during one steady-state training step (forward,
backward, clip, AdamW step, zero_grad) of moelab's model on CPU, from PyTorch's profiler
(`profile_memory=True`; its memory timeline counts every allocation through the CPU allocator,
including the weights and AdamW state that exist before the step). Also reported, for honesty about
the process as the OS sees it: peak resident memory (VmHWM) above the resident memory before the
model was built, which adds glibc's retained free lists, oneDNN caches and thread stacks on top of
the tensors.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

# name -> (model section, micro-batch, seq_len): three shapes that stress different terms (LM head,
# routed experts, depth with dense layers and shared experts).
CONFIGS = {
    "wide-vocab": (
        {
            "vocab_size": 8192,
            "d_model": 128,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "ffn_dim": 256,
            "max_seq_len": 128,
            "moe": {"num_experts": 8, "top_k": 2, "expert_dim": 256},
        },
        4,
        128,
    ),
    "many-experts": (
        {
            "vocab_size": 2048,
            "d_model": 192,
            "n_layers": 2,
            "n_heads": 6,
            "n_kv_heads": 2,
            "ffn_dim": 384,
            "max_seq_len": 128,
            "moe": {"num_experts": 32, "top_k": 4, "expert_dim": 256, "num_shared_experts": 1},
        },
        4,
        128,
    ),
    "deep-mixed": (
        {
            "vocab_size": 1024,
            "d_model": 128,
            "n_layers": 6,
            "n_heads": 4,
            "n_kv_heads": 4,
            "ffn_dim": 512,
            "max_seq_len": 256,
            "moe": {"num_experts": 8, "top_k": 2, "expert_dim": 256, "layers": "every:2"},
        },
        4,
        256,
    ),
}


def add_arguments(p):
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--checkpointing", action="store_true", help="also measure with activation checkpointing")
    p.add_argument("--json", dest="json_out", default="benchmarks/plan.json", help="where to write results")


def rss_and_peak() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes, from /proc (Linux)."""
    rss = hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


def measure_train_peak(
    model_cfg: dict, micro_batch: int, seq_len: int, activation_checkpointing: bool = False, steps: int = 2
) -> dict:
    """Peak live-tensor bytes of one steady-state training step (see module docstring)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from moelab.config import Config, from_dict
    from moelab.model import Transformer
    from moelab.train.optim import build_optimizer

    cfg = from_dict(Config, {"model": model_cfg, "data": {"seq_len": seq_len}})
    rss0, _ = rss_and_peak()
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    if activation_checkpointing:
        from moelab.parallel.compute import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    opt = build_optimizer(model, cfg.train)
    tokens = torch.randint(0, cfg.model.vocab_size, (micro_batch, seq_len + 1))

    def step():
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(steps):  # AdamW state exists from the first step on: steady state after it
        step()
    _, hwm = rss_and_peak()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the timeline export is marked deprecated
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _times, sizes = json.loads(path.read_text())
    return {"peak_tensor_bytes": int(max(sum(s) for s in sizes)), "rss_peak_above_start_bytes": int(hwm - rss0)}


def run(args) -> int:
    import subprocess
    import sys

    from moelab.config import Config, from_dict
    from moelab.plan import train_memory

    rows = []
    for name in args.configs:
        model, mb, seq = CONFIGS[name]
        for ckpt in [False, True] if args.checkpointing else [False]:
            # A fresh process per measurement: nothing left over from the previous model.
            code = (
                "import json,sys; from moelab.bench.plan import measure_train_peak as m; "
                "print(json.dumps(m(*json.loads(sys.argv[1]))))"
            )
            res = subprocess.run(
                [sys.executable, "-c", code, json.dumps([model, mb, seq, ckpt])],
                capture_output=True,
                text=True,
                check=True,
            )
            measured = json.loads(res.stdout.strip().splitlines()[-1])
            cfg = from_dict(Config, {"model": model, "data": {"seq_len": seq}})
            est = train_memory(cfg.model, mb, seq, dtype="float32", activation_checkpointing=ckpt)
            row = {
                "config": name,
                "micro_batch": mb,
                "seq_len": seq,
                "activation_checkpointing": ckpt,
                "planned_peak_bytes": est.peak,
                **measured,
                "planned_over_measured": est.peak / measured["peak_tensor_bytes"],
                "plan": {k: getattr(est, k) for k in ("weights", "grads", "optimizer", "activations")},
            }
            rows.append(row)
            print(
                f"{name:14s} mb={mb:<3d} ckpt={str(ckpt):5s} planned {est.peak / 2**20:8.1f} MiB  measured "
                f"{measured['peak_tensor_bytes'] / 2**20:8.1f} MiB (tensors)  ratio "
                f"{row['planned_over_measured']:.3f}  RSS peak "
                f"{measured['rss_peak_above_start_bytes'] / 2**20:.1f} MiB"
            )
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows}, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0
