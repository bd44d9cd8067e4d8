"""An up-front, coarse upper bound on one rollout's memory, so an impossible config fails at config time.

A typo such as `rollout.m=1000000000` would otherwise grow memory for minutes before the OS kills the
run. The bound counts what a step really holds: every trajectory's tokens in the trees (host), and,
for the in-process `hf` backend, the KV cache of the widest generation wave (all active branches are
decoded as one batch). It is compared with the machine's physical memory; the message names the
fields that set it. Unknown quantities (a model not on disk yet) count as zero, never as a guess
that could refuse a config that fits.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT_TOKENS = 256  # a typical prompt (instruction + question); prompts longer than this add little
HOST_BYTES_PER_TOKEN = 64  # token id + log-prob + entropy + tree bookkeeping, per stored token
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class RolloutMemory:
    trajectories: int  # per step, all processes together
    tokens_per_trajectory: int
    widest_wave: int  # branches decoded together in one generation call
    kv_bytes_per_token: int  # 0 when the model is unknown or the backend pages its own KV cache
    host_bytes: int
    generation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.host_bytes + self.generation_bytes


BUILT_MODEL_CONTEXT = 2048  # `models.tiny_causal_lm`'s max_positions: the built model's context


def _model_shape(cfg: Any) -> tuple[int, int | None]:
    """(KV bytes per token, context length) of the built or on-disk model; (0, None) when unknown.

    KV bytes = 2 (K and V) x layers x KV heads x head size x bytes per element.
    """
    dtype_bytes = _DTYPE_BYTES.get(cfg.model.dtype, 4)
    if not cfg.model.path:
        return 2 * cfg.model.num_layers * cfg.model.hidden_size * dtype_bytes, BUILT_MODEL_CONTEXT
    try:
        hf = json.loads((Path(cfg.model.path) / "config.json").read_text(encoding="utf-8"))
        layers = int(hf["num_hidden_layers"])
        heads = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // heads)
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        context = int(hf["max_position_embeddings"]) if hf.get("max_position_embeddings") else None
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return 0, None  # a hub-style name resolved later, or an unusual config: unknown, so not counted
    return 2 * layers * kv_heads * head_dim * dtype_bytes, context


def estimate_rollout_memory(cfg: Any) -> RolloutMemory:
    """Upper bound of one training step's rollout memory for config `cfg` (a treegrpo Config)."""
    r, tc = cfg.rollout, cfg.trainer
    per_turn = cfg.policy.max_new_tokens + cfg.env.max_obs_tokens
    tokens = PROMPT_TOKENS + (cfg.env.max_turns + 1) * per_turn
    kv, model_context = _model_shape(cfg)
    context = r.max_context_tokens if r.max_context_tokens is not None else model_context
    if context is not None:  # the sampler cuts every branch at the context (the model's, by default)
        tokens = min(tokens, context)
    trajectories = tc.prompts_per_step * r.group_size
    branches = r.num_generations if r.strategy == "chain" else r.m * max(1, r.n)
    widest = tc.prompts_per_step * branches
    kv = kv if cfg.policy.backend == "hf" else 0
    return RolloutMemory(
        trajectories=trajectories,
        tokens_per_trajectory=tokens,
        widest_wave=widest,
        kv_bytes_per_token=kv,
        host_bytes=trajectories * tokens * HOST_BYTES_PER_TOKEN,
        generation_bytes=widest * tokens * kv,
    )


def physical_memory_bytes() -> int | None:
    """Physical memory, or the container's cgroup limit when that is lower (None if unknown)."""
    sizes = []
    with contextlib.suppress(ValueError, OSError, AttributeError):
        sizes.append(int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES")))
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < 1 << 60:  # "max" or a huge sentinel means no limit
            sizes.append(int(raw))
    return min(sizes) if sizes else None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def rollout_memory_problem(cfg: Any, limit_bytes: int | None = None) -> str | None:
    """None if the rollout fits in `limit_bytes` (default: physical memory), else one line naming the fields."""
    limit = limit_bytes if limit_bytes is not None else physical_memory_bytes()
    if limit is None:
        return None
    est = estimate_rollout_memory(cfg)
    if est.total_bytes <= limit:
        return None
    r, tc = cfg.rollout, cfg.trainer
    shape = (
        f"rollout.num_generations={r.num_generations}"
        if r.strategy == "chain"
        else f"rollout.m={r.m} x (1 + rollout.n={r.n} x rollout.l={r.l})"
    )
    length = (
        f"env.max_turns={cfg.env.max_turns}, policy.max_new_tokens={cfg.policy.max_new_tokens}, "
        f"env.max_obs_tokens={cfg.env.max_obs_tokens}, capped by rollout.max_context_tokens or the model's context"
    )
    kv = (
        f" plus the KV cache of {est.widest_wave:,} branches decoded together ({_size(est.generation_bytes)})"
        if est.generation_bytes
        else ""
    )
    return (
        f"a rollout step needs about {_size(est.total_bytes)} but this machine has {_size(limit)}: "
        f"trainer.prompts_per_step={tc.prompts_per_step} x {shape} = {est.trajectories:,} trajectories "
        f"of up to {est.tokens_per_trajectory:,} tokens ({length}){kv}; lower these fields"
    )


__all__ = ["RolloutMemory", "estimate_rollout_memory", "physical_memory_bytes", "rollout_memory_problem"]
