"""Peak memory of one call, honest on CPU and GPU (shared by packing.py and memory.py).

CPU: the process's resident-set high-water mark (VmHWM) is reset to the current RSS
(`/proc/self/clear_refs` = 5) after glibc's free memory is given back to the OS (`malloc_trim(0)`), and
the figure is VmHWM after the call minus VmRSS before it: the extra resident memory the call needed at its
peak. The process must run with `MALLOC_MMAP_THRESHOLD_=65536` (`ALLOCATOR_ENV`): every tensor over 64 KiB
is then its own mmap, returned to the OS when freed, so RSS follows the tensors alive at once. With glibc's
default (a threshold that grows to 32 MB) freed blocks stay in the heap and the same call read 3-4x higher
(fragmentation, not tensors). That setting costs page faults, so the scripts time in a process without it. GPU: `torch.cuda.max_memory_allocated` after a reset, minus the
memory allocated before the call.
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
_LIBC = None
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False  # type: ignore[assignment]
    return _LIBC or None


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def allocator_ready() -> bool:
    """True when this process runs with the allocator setting the CPU figures need."""
    return all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items())


def method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated delta"
    return "CPU resident high-water mark delta (MALLOC_MMAP_THRESHOLD_=65536, malloc_trim, clear_refs reset)"


def peak_mb(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """(peak extra MB during `fn()`, its result)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, out
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = fn()
    return (_status_kb("VmHWM") - base) / 1024, out
