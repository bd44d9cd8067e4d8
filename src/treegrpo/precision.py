"""Mixed precision the standard way: fp32 master weights and optimizer state, bf16 compute.

`model.dtype: bfloat16` loads the checkpoint in bf16 (half the memory while loading); then every
*trainable* parameter is upcast to fp32, so AdamW's state and its updates live in fp32 (at lr 1e-6 a
bf16 weight near 0.02 would not move: its spacing there is 2^-13 ≈ 1.2e-4), and forwards run under
`torch.autocast` in the configured dtype. Frozen parameters (a LoRA base, the reference model) stay in
the compute dtype. float16 training is refused by the trainer (it would need loss scaling).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def fast_bf16() -> bool:
    """Does this machine run bf16 matmuls fast? CUDA with bf16, or a CPU with AVX512-BF16 / AMX tiles."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    cpu = torch.cpu
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


def auto_dtype() -> str:
    """`model.dtype: auto`: bfloat16 where it is fast, float32 elsewhere."""
    return "bfloat16" if fast_bf16() else "float32"


def compute_dtype(dtype_name: str) -> torch.dtype | None:
    """The autocast dtype for `model.dtype`, or None for plain fp32."""
    dtype = getattr(torch, dtype_name)
    return None if dtype == torch.float32 else dtype


def upcast_trainable(model: torch.nn.Module) -> int:
    """Trainable parameters → fp32 in place (the master weights); returns how many were cast."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> Any:
    """`torch.autocast` in `dtype` on `device`'s type; a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    kind = torch.device(device).type
    # No cast cache: autocast caches the low-precision copy of every trainable fp32 weight for the whole
    # context, so a context held across optimizer steps (the warm start runs inside one) would keep
    # computing with the weights as they were when it opened: the training loss would never move
    # (measured: a LoRA warm start in bf16 ended at exactly its starting loss).
    return torch.autocast(device_type=kind, dtype=dtype, cache_enabled=False)


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
