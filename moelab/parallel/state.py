"""Full (unsharded) model and optimizer state for checkpoints that any process count can resume.

Checkpoints stay one `model.safetensors` of full tensors whatever the mesh that wrote them: sharded
state is gathered with `torch.distributed.checkpoint.state_dict` (`full_state_dict=True,
cpu_offload=True`, so only rank 0 holds the result, in host memory) and scattered back on load. A run
saved by 2 processes therefore resumes on 1 and the other way round. Optimizer state is keyed by
parameter name (not by position), which is what makes it portable across wrappings.

The gather/scatter calls are collective: every rank must call them.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from moelab.checkpoint import model_state


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def quiet_redistribute():
    # Gathering or norming an expert shard on the (dp, ep) mesh takes two collectives; DTensor warns
    # about it on every rank for every tensor. The cost is known and small (checkpoints, grad norm).
    log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _tied(model: nn.Module) -> bool:
    cfg = getattr(model, "cfg", None)
    return bool(getattr(cfg, "tie_embeddings", False))


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict on the host (tied LM head stored once). Sharded models: collective, and only
    rank 0 gets the tensors (other ranks get {})."""
    if not is_sharded(model):
        return {k: v.cpu() for k, v in model_state(model).items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    with quiet_redistribute():
        state = get_model_state_dict(model, options=_options(cpu_offload=True))
    if _tied(model):
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a full state dict (as `full_model_state` returns it) into a plain or sharded model; every
    rank passes the full tensors (read from the same file) and keeps its own shard. strict=False loads
    a part (a LoRA run's adapters) and leaves the rest as it is."""
    state = dict(state)
    if _tied(model) and "lm_head.weight" not in state and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]
    if not is_sharded(model):
        model.load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(strict=strict))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"state": {param_name: {"step", "exp_avg", ...}}, "param_groups": [{..., "params": [names]}]},
    full tensors on the host (rank 0 only when sharded). Collective when sharded."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    with quiet_redistribute():
        return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=is_sharded(model)))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())


def gather_train_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
    """(full weights, name-keyed optimizer state) for a training checkpoint of a sharded model, in the
    layout `moelab.train.state` writes; (None, None) for a plain model, whose checkpoint code reads the
    model directly. Collective when sharded; ranks other than 0 get empty dicts."""
    if not is_sharded(model):
        return None, None
    weights = full_model_state(model)
    optim = full_optimizer_state(model, optimizer)
    for group in optim.get("param_groups", []):
        group.pop("param_names", None)
    return weights, optim
