"""Small helpers every expert kernel shares."""

from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def with_zero_row(x: torch.Tensor) -> torch.Tensor:
    """x [N, D] with a row of zeros appended at N: the row padding and dropped assignments point at."""
    return torch.cat([x, x.new_zeros(1, x.shape[1])])
