"""Expert kernels, chosen per device behind one seam.

An expert backend runs the routed part of an MoE layer, from routing decisions to each token's
weighted sum of its experts' outputs:

    backend.moe(x [T, D], gate_up [E, 2F, D], down [E, D, F], topk_ids [T, K], weights [T, K] fp32,
                keep [T, K] bool or None, lora=None) -> [T, D] fp32
    backend.sorted_experts(x_sorted [N, D], gate_up, down, counts [E], lora=None) -> [N, D]

`lora` (optional, `kernels/lora.py`): per-expert low-rank deltas on both expert matmuls, run by the
backend with the same grouping as the base weights (LoRA fine-tuning, multi-adapter serving).

The second entry point is for callers that sort rows themselves (expert parallelism receives rows from
other ranks already grouped by expert). Backends:
- `reference`: the mask-and-loop oracle (`reference.py`);
- `cpu_buckets`: host-planned sort dispatch plus load-bucketed `bmm` calls (`cpu_buckets.py`);
- `grouped_mm`: `torch._grouped_mm` planned on the device, no host sync (`grouped_mm.py`);
- `auto` (default): `grouped_mm` on a GPU where torch's fused grouped kernel runs (Hopper, datacenter
  Blackwell: `fused_grouped_mm`), in bf16, when the widths suit it (the fast kernel and its
  torch.compile support are bf16-only); else `cpu_buckets` (on other GPUs torch's grouped matmul is a
  host-synced loop of matmuls, no better than the buckets).
"""

from __future__ import annotations

import os

import torch

from moelab.kernels.common import compute_dtype
from moelab.kernels.cpu_buckets import CpuBucketsBackend
from moelab.kernels.grouped_mm import GroupedMMBackend, aligned_for_grouped_mm, fused_grouped_mm
from moelab.kernels.reference import ReferenceBackend

EXPERT_BACKENDS = ("auto", "reference", "cpu_buckets", "grouped_mm")


def _grouped_mm_align() -> int:
    # Rows per expert group are padded to a multiple of this; 1 unless a GPU's kernel is found to need it.
    return int(os.environ.get("MOELAB_GROUPED_MM_ALIGN", "1"))


class AutoBackend:
    """Picks `grouped_mm` or `cpu_buckets` by where and in what dtype the experts run (the device and
    the compute dtype, not the data: the choice is made once per pair and kept)."""

    name = "auto"

    def __init__(self, d_model: int, expert_dim: int):
        self.aligned = aligned_for_grouped_mm(d_model, expert_dim)
        self._chosen: dict[tuple[str, torch.dtype], object] = {}

    def resolve(self, device: torch.device | str, dtype: torch.dtype = torch.bfloat16):
        key = (str(torch.device(device)), dtype)
        if key not in self._chosen:
            use_mm = dtype == torch.bfloat16 and self.aligned and fused_grouped_mm(device)
            self._chosen[key] = GroupedMMBackend(_grouped_mm_align()) if use_mm else CpuBucketsBackend()
        return self._chosen[key]

    def moe(self, x, gate_up, down, topk_ids, weights, keep=None, lora=None):
        return self.resolve(x.device, compute_dtype(x)).moe(x, gate_up, down, topk_ids, weights, keep, lora=lora)

    def sorted_experts(self, x_sorted, gate_up, down, counts, lora=None):
        return self.resolve(x_sorted.device, compute_dtype(x_sorted)).sorted_experts(
            x_sorted, gate_up, down, counts, lora=lora
        )


def build_expert_backend(name: str, d_model: int, expert_dim: int):
    """The backend object for `moe.expert_backend` (validated by the config)."""
    if name == "auto":
        return AutoBackend(d_model, expert_dim)
    if name == "reference":
        return ReferenceBackend()
    if name == "cpu_buckets":
        return CpuBucketsBackend()
    if name == "grouped_mm":
        if not aligned_for_grouped_mm(d_model, expert_dim):
            raise ValueError(
                f"moe.expert_backend=grouped_mm needs d_model and expert_dim multiples of 8, "
                f"got {d_model} and {expert_dim}"
            )
        return GroupedMMBackend(_grouped_mm_align())
    raise ValueError(f"moe.expert_backend: expected one of {', '.join(EXPERT_BACKENDS)}, got {name!r}")


def backend_name(backend, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> str:
    """The kernel that actually runs on `device` in `dtype` (resolves `auto`)."""
    return backend.resolve(device, dtype).name if isinstance(backend, AutoBackend) else backend.name


__all__ = [
    "EXPERT_BACKENDS",
    "AutoBackend",
    "CpuBucketsBackend",
    "GroupedMMBackend",
    "ReferenceBackend",
    "backend_name",
    "build_expert_backend",
    "fused_grouped_mm",
]
