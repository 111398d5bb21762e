"""One profiled call for the benchmarks' `--profile`: where a step's time goes.

On a GPU the questions are which kernels take the device time and whether the device is busy at all
(a step bound by the host launching small kernels shows device time far below its wall time); on a CPU,
which operators take the time. torch.profiler answers both; this keeps the answer small enough for a
benchmark's JSON.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def profile_call(fn: Callable[[], object], device: torch.device, rows: int = 25) -> dict:
    """Run `fn` once under torch.profiler. Returns {"table": the top `rows` operators/kernels by self
    device time (CPU time on a CPU), "wall_s": the call's wall time (after a device sync), and on CUDA
    "device_busy_s": the summed time of its device activities (kernels, copies, memsets; the profiler
    inflates small ones a little) and "kernels": how many there were}."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - t0
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    out: dict = {
        "table": prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60),
        "wall_s": wall,
    }
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]  # kernels, copies, memsets
        out["kernels"] = len(kernels)
        out["device_busy_s"] = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    return out
