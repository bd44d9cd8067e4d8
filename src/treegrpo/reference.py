"""The KL reference: a frozen copy of the policy as training starts (after any warm start).

It is made from the placed model, so it sits on the policy's device. With mixed precision it is kept in
the compute dtype (it needs no master weights). A LoRA policy that was not warm-started needs no copy:
its adapters start at zero, so the base with the adapters disabled *is* the starting policy. After a
LoRA warm start that is no longer true (the adapter already moved), so the reference is a frozen copy.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from treegrpo.packing import PackedBatch, forward_logprobs


def is_lora(model: Any) -> bool:
    return hasattr(model, "disable_adapter")


def reference_model(model: torch.nn.Module, warm_started: bool, dtype: torch.dtype | None = None) -> Any:
    """A frozen, eval-mode copy of `model` (in `dtype` if given); None for a fresh LoRA adapter."""
    if is_lora(model) and not warm_started:
        return None
    ref = copy.deepcopy(model)
    if dtype is not None:
        ref.to(dtype)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def reference_logprobs(ref: Any, policy: Any, batch: PackedBatch, temperature: float) -> Tensor:
    """Log-probs of `batch` under the reference (`ref`, or `policy` with its adapters disabled)."""
    if ref is not None:
        return forward_logprobs(ref, batch, temperature, compute_entropy=False)[0]
    with policy.disable_adapter():
        return forward_logprobs(policy, batch, temperature, compute_entropy=False)[0]
