"""The sampling policy a config asks for (`policy.backend`): in-process hf, colocated vLLM, or a served model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from treegrpo.config import Config
from treegrpo.policies.hf import HFPolicy


def make_policy(model: Any, tokenizer: Any, cfg: Config, greedy: bool, seed: int) -> Any:
    """The `policy.backend` policy over `model` (hf, vllm) or over a served copy of it (openai)."""
    pc = cfg.policy
    common = dict(
        top_p=pc.top_p, max_new_tokens=pc.max_new_tokens, greedy=greedy or pc.temperature == 0, seed=seed
    )
    max_ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if pc.backend == "openai":  # servers; training pushes its weights to them after each update
        from treegrpo.policies.routing import policy_for_config

        return policy_for_config(cfg, tokenizer, int(max_ctx) if max_ctx else None, greedy=greedy, seed=seed)
    if pc.backend == "vllm":
        import os

        from treegrpo.policies.vllm import VLLMPolicy, import_vllm

        import_vllm()  # fail with the install hint before writing anything
        path = Path(cfg.model.path) if cfg.model.path else None
        if path is not None and not path.is_dir():
            from treegrpo.pretrained import resolve_model_path

            path = resolve_model_path(cfg.model.path, cfg.cache_dir)
        if path is None:  # the tiny model lives only in memory: vLLM loads from disk, weights synced after
            path = Path(cfg.cache_dir) / "vllm-init" / f"{cfg.name}-{os.getpid()}"
            if not (path / "config.json").is_file():
                model.save_pretrained(path)
                tokenizer.save_pretrained(path)
        return VLLMPolicy.for_model(
            model,
            path,
            tokenizer,
            temperature=pc.temperature,
            entropy_topk=pc.entropy_topk,
            max_context=cfg.rollout.max_context_tokens or (int(max_ctx) if max_ctx else None),
            gpu_memory_utilization=pc.vllm_gpu_memory_utilization,
            dtype=cfg.model.dtype,
            engine_kwargs=pc.vllm_kwargs,
            **common,
        )
    return HFPolicy(model, tokenizer, temperature=max(pc.temperature, 1e-6), **common)
