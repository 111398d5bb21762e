"""A small, exact training loop shared by the single-process reference and the spawned ranks.

Spawned workers get the torchrun environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*), so
`init_parallel` takes the same path as under torchrun.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from pathlib import Path

import torch

from moelab.config import Config, from_dict

TINY = {
    "model": {
        "vocab_size": 64,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "ffn_dim": 64,
        "max_seq_len": 16,
        "moe": {
            "num_experts": 4,
            "top_k": 2,
            "expert_dim": 16,
            "num_shared_experts": 1,
            "shared_expert_dim": 8,
            "load_balance_coef": 0.01,
            "z_loss_coef": 0.001,
        },
    },
    "data": {"seq_len": 16},
    "train": {"batch_size": 8, "lr": 1e-2, "weight_decay": 0.1, "grad_clip": 1.0},
}


def tiny_config(parallel: dict | None = None, finetune: dict | None = None, **model_overrides) -> Config:
    data = json.loads(json.dumps(TINY))
    data["model"].update(model_overrides)
    data["parallel"] = parallel or {}
    data["finetune"] = finetune or {}
    return from_dict(Config, data)


def global_batch(cfg: Config, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable sequences (t -> 3t + c mod V, c per row) so the losses fall and updates are large."""
    g = torch.Generator().manual_seed(1000 + step)
    b, s, v = cfg.train.batch_size, cfg.data.seq_len + 1, cfg.model.vocab_size
    start = torch.randint(0, v, (b, 1), generator=g)
    c = torch.randint(1, 4, (b, 1), generator=g)
    tokens = [start]
    for _ in range(s - 1):
        tokens.append((tokens[-1] * 3 + c) % v)
    tokens = torch.cat(tokens, dim=1)
    return tokens[:, :-1], tokens[:, 1:]


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    from moelab.train.optim import build_optimizer  # the trainer's AdamW parameter groups

    return build_optimizer(model, cfg.train)


def train(cfg: Config, steps: range) -> dict[str, list]:
    """Train `steps` of the global batch sequence; return the global-batch loss and the gradient norm
    of each step (Adam hides a wrongly scaled gradient from the losses; the norm does not), and which
    parameters trained (`finetune:` freezes or adds LoRA before sharding, as the trainer does)."""
    from moelab.finetune.lora import apply_finetune
    from moelab.model import Transformer
    from moelab.parallel import clip_grad_norm_, init_parallel, parallelize

    ctx = init_parallel(cfg.parallel, cfg.model)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    if cfg.finetune.mode != "all":
        apply_finetune(model, cfg.finetune)
    model = parallelize(model, ctx)
    opt = make_optimizer(model, cfg)
    losses, norms, frozen_with_grad = [], [], []
    for step in steps:
        x, y = global_batch(cfg, step)
        rows = ctx.local_batch(cfg.train.batch_size)
        out = model(x[rows], y[rows])
        out.loss.backward()
        # a frozen parameter gets no gradient (and so no optimizer state)
        frozen_with_grad += [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        norms.append(float(clip_grad_norm_(model.parameters(), cfg.train.grad_clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(ctx.mean(out.loss.detach()))
    ctx.close()
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    return {
        "loss": losses,
        "grad_norm": norms,
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "optimized": sorted(n for n, p in model.named_parameters() if id(p) in optimized),
        "frozen_with_grad": frozen_with_grad,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, job: dict, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    result: dict = {}
    try:
        cfg = from_dict(Config, job["config"])
        result.update(train(cfg, range(*job["steps"])))
    except BaseException as e:  # reported to the test, which fails with the message
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    # Leave without interpreter finalization, as `moelab` itself does under torchrun (cli.exit_process):
    # gloo worker threads of a process group that DTensor meshes keep alive can abort the process
    # (SIGABRT, "terminate called without an active exception") when finalization destroys them.
    from moelab.cli import exit_process

    exit_process(0)


def spawn(world: int, job: dict, out_dir: Path, timeout: float = 120.0) -> list[dict]:
    """Run `job` on `world` spawned ranks; return each rank's result dict."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _worker, args=(world, free_port(), job, str(out_dir)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks did not finish within {timeout:.0f}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
