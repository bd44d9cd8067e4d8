"""Atomic, verified checkpoints: a run survives kill -9 at any moment and a damaged file.

A checkpoint is written into a temporary directory and renamed into place, so a directory named
`step-NNNNNN` is always complete. It holds the model (or LoRA adapter) and tokenizer in plain
`save_pretrained` form, plus the optimizer, scheduler, RNG states and data position, and, written
last, `manifest.json` with the size and sha256 of every other file. `latest_checkpoint` verifies the
manifest and falls back to the newest intact checkpoint (a truncated or bit-flipped file, e.g. after
a full disk or a bad copy, costs the steps since the previous checkpoint, not the run). Only finite
weights and optimizer state are ever written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from treegrpo.errors import UserError

MANIFEST = "manifest.json"
_MANIFEST_FORMAT = "treegrpo-checkpoint-1"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(UserError):
    """No usable checkpoint (every one is damaged), or a checkpoint file cannot be loaded."""


class NonFiniteStateError(UserError):
    """Refused to write a checkpoint: some weight or optimizer tensor holds inf/nan."""


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
    """Write checkpoint `step` atomically and prune all but the newest `keep_last`.

    Raises NonFiniteStateError (and writes nothing) if the model or optimizer state is not finite:
    a checkpoint of inf/nan weights would replace a good one under `keep_last` and poison a resume.
    """
    bad = nonfinite_tensors(model, optimizer)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteStateError(
            f"refusing to write checkpoint step-{step:06d}: non-finite values in {', '.join(bad[:3])}{more}"
        )
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
    _write_manifest(tmp)  # last: its presence and contents vouch for every other file
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
    """The newest intact checkpoint (None if there are none at all).

    Each damaged newer checkpoint is skipped with a one-line warning naming it; if checkpoints exist
    but none is intact, CheckpointError names them (the CLI prints one line, exit 2).
    """
    problems: list[str] = []
    for p in reversed(list_checkpoints(ckpt_root)):
        problem = verify_checkpoint(p)
        if problem is None:
            return p
        problems.append(f"{p.name}: {problem}")
        warnings.warn(f"skipping damaged checkpoint {p}: {problem}", stacklevel=2)
    if problems:
        raise CheckpointError(f"{ckpt_root}: no intact checkpoint left ({'; '.join(problems)})")
    return None


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    for p in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_root.glob(".tmp-step-*"):  # leftovers of a killed writer
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def load_trainer_state(
    ckpt: Path, optimizer: torch.optim.Optimizer, scheduler: Any, np_rng: np.random.Generator
) -> TrainerState:
    """Restore optimizer, scheduler and RNGs in place; return step and data position.

    A file that cannot be read or does not fit is a CheckpointError naming it, never a traceback.
    """
    try:
        blob = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None and blob["scheduler"] is not None:
            scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"], np_rng)
    except Exception as e:  # noqa: BLE001 - pickle/zip/shape errors of a damaged or foreign file
        raise CheckpointError(f"{ckpt / 'trainer_state.pt'}: cannot be loaded ({_first_line(e)})") from None
    try:
        meta = json.loads((ckpt / "trainer_state.json").read_text())
        return TrainerState(
            step=int(meta["step"]), data_position=int(meta["data_position"]), extra=meta.get("extra", {})
        )
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{ckpt / 'trainer_state.json'}: cannot be loaded ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# -- finite state ----------------------------------------------------------------------------------
def nonfinite_tensors(model: Any, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Names of the model's floating-point parameters/buffers and optimizer state tensors with inf/nan.

    Optimizer entries are named `optimizer.<param name>.<state key>` (e.g. `optimizer.lm_head.weight.exp_avg`).
    One fused check per tensor; for a 135M-parameter model this is a few milliseconds on a GPU.
    """
    bad: list[str] = []
    names: dict[int, str] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        names[id(t)] = name
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            bad.append(name)
    if optimizer is not None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                for key, value in optimizer.state.get(param, {}).items():
                    floating = isinstance(value, torch.Tensor) and value.is_floating_point()
                    if floating and not bool(torch.isfinite(value).all()):
                        bad.append(f"optimizer.{names.get(id(param), '?')}.{key}")
    return bad


# -- integrity -------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(ckpt: Path) -> None:
    files = {
        p.relative_to(ckpt).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    with open(ckpt / MANIFEST, "w") as f:
        json.dump({"format": _MANIFEST_FORMAT, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoint(ckpt: Path) -> str | None:
    """None if `ckpt` is intact, else what is wrong (one short phrase naming the file)."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _verify_by_loading(ckpt)  # written before manifests existed
    except (OSError, ValueError) as e:
        return f"{MANIFEST} is unreadable ({_first_line(e)})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or manifest.get("format") != _MANIFEST_FORMAT:
        return f"{MANIFEST} is not a treegrpo checkpoint manifest"
    for rel, entry in files.items():
        path = ckpt / rel
        try:
            size = path.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if not isinstance(entry, dict) or size != entry.get("size"):
            return f"{rel} has {size} bytes, the manifest says {entry.get('size') if isinstance(entry, dict) else '?'}"
        if _sha256(path) != entry.get("sha256"):
            return f"{rel} does not match its checksum"
    if "trainer_state.json" not in files or not any(r.endswith(".safetensors") for r in files):
        return "incomplete (no trainer_state.json or weights)"
    return None


def _verify_by_loading(ckpt: Path) -> str | None:
    """A checkpoint without a manifest: intact if every JSON, safetensors and torch file loads."""
    from safetensors import safe_open

    if not (ckpt / "trainer_state.json").is_file() or not any(ckpt.glob("*.safetensors")):
        return f"incomplete (no {MANIFEST}, trainer_state.json or weights)"
    for p in sorted(ckpt.iterdir()):
        try:
            if p.suffix == ".json":
                json.loads(p.read_text(encoding="utf-8"))
            elif p.suffix == ".safetensors":
                with safe_open(str(p), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                        f.get_tensor(key)
            elif p.suffix == ".pt":
                torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any parse error means "damaged"
            return f"{p.name} cannot be loaded ({_first_line(e)})"
    return None


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
