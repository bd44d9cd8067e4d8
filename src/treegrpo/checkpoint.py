"""Atomic checkpoints: a run survives kill -9 at any moment.

A checkpoint is written into a temporary directory and renamed into place, so a directory named
`step-NNNNNN` is always complete. It holds the model (or LoRA adapter) and tokenizer in plain
`save_pretrained` form, plus the optimizer, scheduler, RNG states and data position.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from treegrpo.errors import UserError

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class TrainerState:
    """What, besides weights, must survive a restart to continue the run identically."""

    step: int
    data_position: int
    extra: dict[str, Any]


def rng_state(np_rng: np.random.Generator) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np_rng.bit_generator.state,
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any], np_rng: np.random.Generator) -> None:
    random.setstate(state["python"])
    np_rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    np_rng: np.random.Generator,
    state: TrainerState,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep_last`."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(np_rng),
        },
        tmp / "trainer_state.pt",
    )
    with open(tmp / "trainer_state.json", "w") as f:
        json.dump({"step": state.step, "data_position": state.data_position, "extra": state.extra}, f)
        f.flush()
        os.fsync(f.fileno())
    for p in tmp.iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # same step written twice (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    prune_checkpoints(ckpt_root, keep_last)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary (interrupted) directories are ignored."""
    if not ckpt_root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    ckpts = [p for p in list_checkpoints(ckpt_root) if (p / "trainer_state.json").is_file()]
    return ckpts[-1] if ckpts else None


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    for p in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_root.glob(".tmp-step-*"):  # leftovers of a killed writer
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def load_trainer_state(
    ckpt: Path, optimizer: torch.optim.Optimizer, scheduler: Any, np_rng: np.random.Generator
) -> TrainerState:
    """Restore optimizer, scheduler and RNGs in place; return step and data position."""
    blob = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"], np_rng)
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    return TrainerState(
        step=int(meta["step"]), data_position=int(meta["data_position"]), extra=meta.get("extra", {})
    )


def load_weights(model: Any, ckpt: Path) -> None:
    """Load a checkpoint's weights into `model` in place (full model or LoRA adapter)."""
    from safetensors.torch import load_file

    adapter = ckpt / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    files = sorted(ckpt.glob("model*.safetensors"))
    if not files:
        raise UserError(f"{ckpt}: no model weights found")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if "lm_head" not in k]  # tied embeddings are saved once
    if real_missing or unexpected:
        raise UserError(
            f"{ckpt}: weights do not match the model (missing {real_missing[:3]}, unexpected {unexpected[:3]})"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
