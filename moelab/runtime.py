"""Process-level performance settings for CPU runs.

glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free, so a training
step that allocates the same large activations and gradients again pays a page fault per 4 KiB page
each time (measured here: the MoE layer benchmark spent more time in first-touch faults than in
matmuls at E = 128). Turning mmap off keeps freed blocks in the heap for reuse, as jemalloc or
tcmalloc would. Opt out with MOELAB_MALLOC_TUNING=0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_done = False


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the heap (glibc only). Returns True when the setting was applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("MOELAB_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    _done = ok
    return ok
