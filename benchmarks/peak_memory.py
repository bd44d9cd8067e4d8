"""Peak memory of one call, honest on CPU and GPU (shared by packing.py and memory.py).

CPU: glibc's free memory is given back to the OS (`malloc_trim(0)`), the process's resident-set
high-water mark (VmHWM) is reset to the current RSS (`/proc/self/clear_refs` = 5), and the figure is VmHWM
after the call minus VmRSS before it: the extra resident memory the call needed at its peak. Memory freed
by earlier calls is not resident any more, so it cannot hide a later call's peak. (The allocator's own
fragmentation is counted: an honest upper bound on the tensors live at once.) GPU: `torch.cuda.max_memory_allocated` after a reset, minus the
memory allocated before the call.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
_LIBC = None


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


def method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated delta"
    return "CPU resident high-water mark delta (malloc_trim, clear_refs reset)"


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
