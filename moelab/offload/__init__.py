"""Models larger than memory: routed experts read lazily from memory-mapped safetensors and kept by a
pluggable placement policy (keep all, LRU of N on the device, first N layers on the host)."""

from moelab.offload.model import OffloadedExperts, load_offloaded
from moelab.offload.placement import LRU, HostLayers, KeepAll, OffloadMetrics, Placement, build_placement
from moelab.offload.store import MmapExpertStore

__all__ = [
    "HostLayers",
    "KeepAll",
    "LRU",
    "MmapExpertStore",
    "OffloadMetrics",
    "OffloadedExperts",
    "Placement",
    "build_placement",
    "load_offloaded",
]
