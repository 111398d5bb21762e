"""Where each expert lives, and how its weights reach the computation: pluggable placement policies.

Tiers: the memory-mapped file (slow, everything), host memory, and the compute device (fast). On a
CPU-only machine the device tier is a second buffer in RAM, so the policies and their metrics behave
exactly as they would with a GPU; only the cost of a move differs.

- `KeepAll`: every expert is loaded into the device tier the first time it is used and stays there.
- `LRU(capacity)`: a fixed buffer of `capacity` expert slots on the device (shared by all layers);
  a miss reads the expert from disk into the least recently used slot.
- `HostLayers(n, inner)`: the experts of the first `n` MoE layers are kept in host memory (llama.cpp's
  `--n-cpu-moe`): on CPU they are used where they are, on an accelerator copied over per use; the
  other layers follow `inner` (default `KeepAll`).

Metrics (`OffloadMetrics`): hits (served without reading the file), misses, bytes moved (file to
host/device and host to device), seconds stalled waiting for those moves. Loads are synchronous, so
all load time is stall time.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch

from moelab.errors import UserError
from moelab.offload.store import MmapExpertStore


@dataclass
class OffloadMetrics:
    hits: int = 0
    misses: int = 0
    bytes_moved: int = 0
    stall_seconds: float = 0.0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    def to_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class Placement:
    """Serves (gate_up [2F, D], down [D, F]) of expert `e` of MoE layer `layer` on `device`."""

    def __init__(
        self,
        store: MmapExpertStore,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        metrics: OffloadMetrics | None = None,
    ):
        self.store, self.device, self.dtype = store, torch.device(device), dtype
        self.metrics = metrics if metrics is not None else OffloadMetrics()

    def get(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def resident_bytes(self) -> int:
        """Bytes of expert weights this policy holds (host and device tiers)."""
        raise NotImplementedError

    def _load(self, layer: int, expert: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        gu, dn = self.store.read(layer, expert)
        self.metrics.bytes_moved += _nbytes(gu, dn)
        gu = gu.to(device=device, dtype=self.dtype or gu.dtype)
        dn = dn.to(device=device, dtype=self.dtype or dn.dtype)
        self.metrics.misses += 1
        self.metrics.stall_seconds += time.perf_counter() - t0
        return gu, dn


class KeepAll(Placement):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.experts: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, layer, expert):
        key = (layer, expert)
        if key in self.experts:
            self.metrics.hits += 1
            return self.experts[key]
        self.experts[key] = self._load(layer, expert, self.device)
        return self.experts[key]

    def resident_bytes(self) -> int:
        return sum(_nbytes(*w) for w in self.experts.values())


class LRU(Placement):
    """`capacity` preallocated slots on the device; the least recently used expert is overwritten."""

    def __init__(self, store, capacity: int, device="cpu", dtype=None, metrics=None):
        super().__init__(store, device, dtype, metrics)
        if capacity < 1:
            raise UserError(f"expert cache: LRU capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.slots: OrderedDict[tuple[int, int], int] = OrderedDict()  # key -> slot, oldest first
        self.gate_up: torch.Tensor | None = None  # [capacity, 2F, D], allocated at the first miss
        self.down: torch.Tensor | None = None

    def get(self, layer, expert):
        key = (layer, expert)
        slot = self.slots.get(key)
        if slot is not None:
            self.slots.move_to_end(key)
            self.metrics.hits += 1
            return self.gate_up[slot], self.down[slot]
        t0 = time.perf_counter()
        gu, dn = self.store.read(layer, expert)
        if self.gate_up is None:
            dt = self.dtype or gu.dtype
            self.gate_up = torch.empty(self.capacity, *gu.shape, dtype=dt, device=self.device)
            self.down = torch.empty(self.capacity, *dn.shape, dtype=dt, device=self.device)
        if len(self.slots) < self.capacity:
            slot = len(self.slots)
        else:
            _, slot = self.slots.popitem(last=False)
            self.metrics.evictions += 1
        self.gate_up[slot].copy_(gu)
        self.down[slot].copy_(dn)
        self.slots[key] = slot
        self.metrics.misses += 1
        self.metrics.bytes_moved += _nbytes(gu, dn)
        self.metrics.stall_seconds += time.perf_counter() - t0
        return self.gate_up[slot], self.down[slot]

    def resident_bytes(self) -> int:
        return 0 if self.gate_up is None else _nbytes(self.gate_up, self.down)


class HostLayers(Placement):
    """Experts of MoE layers with index < the first `n` MoE layer ids stay in host memory."""

    def __init__(
        self,
        store,
        n_layers: int,
        moe_layer_ids: list[int],
        inner: Placement | None = None,
        device="cpu",
        dtype=None,
        metrics=None,
    ):
        super().__init__(store, device, dtype, metrics)
        if n_layers < 0:
            raise UserError(f"expert placement: host layers must be >= 0, got {n_layers}")
        self.host_layers = set(sorted(moe_layer_ids)[:n_layers])
        self.inner = inner if inner is not None else KeepAll(store, device, dtype, self.metrics)
        self.inner.metrics = self.metrics
        self.host: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, layer, expert):
        if layer not in self.host_layers:
            return self.inner.get(layer, expert)
        key = (layer, expert)
        if key not in self.host:
            self.host[key] = self._load(layer, expert, torch.device("cpu"))
        else:
            self.metrics.hits += 1
        gu, dn = self.host[key]
        if self.device.type == "cpu":
            return gu, dn
        t0 = time.perf_counter()  # an accelerator computes on its own copy: host -> device per use
        out = gu.to(self.device, non_blocking=True), dn.to(self.device, non_blocking=True)
        self.metrics.bytes_moved += _nbytes(gu, dn)
        self.metrics.stall_seconds += time.perf_counter() - t0
        return out

    def resident_bytes(self) -> int:
        return sum(_nbytes(*w) for w in self.host.values()) + self.inner.resident_bytes()


def build_placement(
    spec: str, store: MmapExpertStore, moe_layer_ids: list[int], device="cpu", dtype: torch.dtype | None = None
) -> Placement:
    """'keep-all' | 'lru:N' | 'host-layers:N' | 'host-layers:N+lru:M'."""
    spec = spec.strip()
    head, _, rest = spec.partition("+")
    kind, _, arg = head.partition(":")
    try:
        if kind == "keep-all" and not arg and not rest:
            return KeepAll(store, device, dtype)
        if kind == "lru" and not rest:
            return LRU(store, int(arg), device, dtype)
        if kind == "host-layers":
            inner = build_placement(rest, store, moe_layer_ids, device, dtype) if rest else None
            return HostLayers(store, int(arg), moe_layer_ids, inner, device, dtype)
    except ValueError:
        pass
    raise UserError(f"expert placement: expected keep-all, lru:N, host-layers:N or host-layers:N+lru:M, got {spec!r}")
