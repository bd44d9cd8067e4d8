"""The cache of a pretrained model's warm start (SFT on demonstrations; `build.build_run` runs it).

Why cached: on a CPU the warm start of SmolLM2-135M takes minutes; a second run with the same settings
should start RL in seconds, as the quickstart's does. The cache key is build's (task, model, warm start,
environment, seed: everything that shapes the warm-started weights). A LoRA model stores only its
adapter (a few MB) and reloads it onto the cached base; a full fine-tune stores the whole model.
"""

from __future__ import annotations

import json
import os
import shutil
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
