"""Gradient norm and clipping for parameters sharded over several meshes (dense FSDP, expert (dp, ep))."""

from __future__ import annotations

import torch

from moelab.parallel.state import quiet_redistribute


def grad_norm(params) -> torch.Tensor:
    """Global L2 norm of the gradients of possibly sharded parameters. Gradients live on up to three
    meshes (dense, expert, plain); each group's norm is reduced over its own mesh, then combined."""
    from torch.distributed.tensor import DTensor

    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
    total = None
    for grads in groups.values():
        with quiet_redistribute():
            n = torch.nn.utils.get_total_norm(grads, 2.0)
            n = (n.full_tensor() if isinstance(n, DTensor) else n).float().cpu()
        total = n.square() if total is None else total + n.square()
    return torch.zeros(()) if total is None else total.sqrt()


def _sharded(params) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a mix of sharded and plain parameters (plain ones alone go
    straight to torch's); returns the norm before clipping, the same on every rank."""
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.grad is not None]
    if not _sharded(params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = grad_norm(params)
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0:
        for p in params:
            (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(coef)
    return total
