"""The warm start of a pretrained model (SFT on the task's demonstrations), cached on disk.

Why cached: on a CPU the warm start of SmolLM2-135M takes minutes; a second run with the same settings
should start RL in seconds, as the quickstart's does. The cache key is build's (task, model, warm start,
environment, seed: everything that shapes the warm-started weights). A LoRA model stores only its
adapter (a few MB) and reloads it onto the cached base; a full fine-tune stores the whole model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from treegrpo.config import Config

INFO_FILE = "warmstart.json"


def cached_warm_start(cache: Path) -> bool:
    """Does `cache` hold a complete warm start (weights and its info file; written atomically)?"""
    weights = ("adapter_model.safetensors", "model.safetensors", "config.json")
    return (cache / INFO_FILE).is_file() and any((cache / w).is_file() for w in weights)


def load_cached(cfg: Config, cache: Path, base_path: Path) -> tuple[Any, dict[str, Any]]:
    """The warm-started model from `cache` (trainable), and its recorded info with `cached: True`."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, cfg.model.dtype)
    info = json.loads((cache / INFO_FILE).read_text())
    if (cache / "adapter_model.safetensors").is_file():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(
            str(base_path), dtype=dtype, attn_implementation=cfg.model.attn_implementation
        )
        model = PeftModel.from_pretrained(base, str(cache), is_trainable=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(cache), dtype=dtype, attn_implementation=cfg.model.attn_implementation
        )
    info["cached"] = True
    return model, info


def save_warm_start(model: Any, cache: Path, info: dict[str, Any]) -> None:
    """Write the model (adapter only for LoRA) and `info` to `cache`, atomically (tmp dir + rename)."""
    tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)


def warm_start_pretrained(
    cfg: Config,
    model: Any,
    tokenizer: Any,
    env: Any,
    task: Any,
    log: Callable[[str], None],
    on_sft_step: Any = None,
) -> dict[str, Any]:
    """SFT `model` (its LoRA adapter, when enabled) on the task's oracle demonstrations, in place."""
    from treegrpo.precision import autocast, compute_dtype, model_device, upcast_trainable
    from treegrpo.sft import warm_start

    ws = cfg.warmstart
    upcast_trainable(model)  # the warm start trains: fp32 master weights, compute in model.dtype
    demos = task.demonstrations(n=ws.num_demos, early_stop_prob=ws.early_stop_prob, seed=cfg.seed)
    log(f"warm start: SFT of {cfg.model.path} on {len(demos)} demonstrations ({ws.epochs} epochs)")
    t0 = time.perf_counter()
    with autocast(model_device(model), compute_dtype(cfg.model.dtype)):
        stats = warm_start(
            model,
            tokenizer,
            env,
            demos,
            epochs=ws.epochs,
            lr=ws.lr,
            batch_size=ws.batch_size,
            seed=cfg.seed,
            on_step=on_sft_step,
        )
    return {"cached": False, "sft": stats.to_dict(), "seconds": time.perf_counter() - t0}
