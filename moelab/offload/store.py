"""Experts read lazily from a memory-mapped safetensors checkpoint.

`safetensors.safe_open` maps the file; `get_slice(name)[e]` is a view of one expert in the mapping,
which `read` copies out, so only that expert's pages are read. Pages a process has touched through
a mapping count towards its resident set for as long as the mapping exists, even after the copy is
gone; the store therefore re-opens the file (dropping the old mapping) after every `remap_bytes`
read, which keeps resident memory at what the caches hold plus at most that much (the page cache
itself is the kernel's, shared and reclaimable, and not part of the process).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors import safe_open

from moelab.errors import UserError


def expert_keys(layer: int) -> tuple[str, str]:
    return f"layers.{layer}.ffn.experts.gate_up", f"layers.{layer}.ffn.experts.down"


class MmapExpertStore:
    """The slow tier: every expert of every MoE layer, on disk, read on demand."""

    def __init__(self, path: str | Path, remap_bytes: int = 64 << 20):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such safetensors file")
        self.remap_bytes = remap_bytes
        self._file = None
        self._since_open = 0
        self.bytes_read = 0
        self.read_seconds = 0.0
        with safe_open(str(self.path), framework="pt") as f:
            self.keys = set(f.keys())

    def _handle(self):
        if self._file is None or self._since_open >= self.remap_bytes:
            self._file = None  # unmaps: its touched pages leave this process's resident set
            self._file = safe_open(str(self.path), framework="pt")
            self._since_open = 0
        return self._file

    def has_layer(self, layer: int) -> bool:
        return all(k in self.keys for k in expert_keys(layer))

    def read(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2F, D], down [D, F]) of one expert, as fresh host tensors."""
        t0 = time.perf_counter()
        gu_key, dn_key = expert_keys(layer)
        f = self._handle()
        # A slice is a view into the mapping (nothing read yet); clone makes the read happen here, so
        # it is timed as a stall and the caller owns the bytes instead of pinning the mapping.
        gu = f.get_slice(gu_key)[expert].clone()
        dn = f.get_slice(dn_key)[expert].clone()
        n = gu.numel() * gu.element_size() + dn.numel() * dn.element_size()
        self._since_open += n
        self.bytes_read += n
        self.read_seconds += time.perf_counter() - t0
        return gu, dn

    def read_rest(self) -> dict[str, torch.Tensor]:
        """Every tensor that is not a routed expert (attention, norms, routers, embeddings, ...)."""
        with safe_open(str(self.path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if ".ffn.experts." not in k}

    def close(self) -> None:
        self._file = None
