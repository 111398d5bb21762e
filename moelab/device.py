"""Device names users type (`train.device`, `--device`) -> torch.device, and placement checks.

`auto` is CUDA when available, else the CPU; `cuda` means the current CUDA device (cuda:0 unless set)
and is returned with its index, so it compares equal to the `device` of the tensors placed there.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.errors import UserError


def resolve_device(name: str | torch.device, what: str = "train.device") -> torch.device:
    """The torch.device for `name` (auto, cpu, cuda, cuda:N), or a UserError naming `what`. A
    torch.device is taken as given (library callers, tests on the `meta` device)."""
    if isinstance(name, torch.device):
        return name
    name = str(name).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise UserError(f"{what}: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{what}={name!r}, but CUDA is not available (use auto or cpu)")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        raise UserError(f"{what}={name!r}, but this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def use_device(device: torch.device) -> None:
    """Make a CUDA device the current one (kernels, streams and generators created without an explicit
    device go there, e.g. for cuda:1); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def misplaced(module: nn.Module, device: torch.device) -> list[str]:
    """Names of the parameters and buffers of `module` that are not on `device` (empty: all placed)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    out = []
    for kind, items in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, t in items:
            if t.device != device:
                out.append(f"{kind} {name} on {t.device}")
    return out


def check_on_device(module: nn.Module, device: torch.device, what: str = "model") -> None:
    """Raise (an internal error, not the user's) when part of `module` is not on `device`."""
    bad = misplaced(module, device)
    if bad:
        raise RuntimeError(f"{what}: {len(bad)} tensors are not on {device}: {', '.join(bad[:3])}")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on `device`. For CUDA through pinned memory and a non-blocking copy, so the transfer
    overlaps the previous step's kernels (the caching host allocator keeps the pinned buffer alive until
    the copy is done)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
