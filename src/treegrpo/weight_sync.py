"""Keep the generation servers on the trainer's weights, and refuse rollouts that are too stale.

One interface, `WeightSync.sync(model, step) -> version`, called after every optimizer update (and once
before the first rollout), with three implementations:

- `LoraSync`: save the adapter atomically into `root/step-N` (a temporary dir renamed into place), then
  `POST /v1/load_lora_adapter {lora_name: "step-N", lora_path}` on every server (vLLM's run-time LoRA API,
  also served by `treegrpo serve-policy`); the policy's requests then name `step-N`. Older adapters beyond
  `keep_last` are unloaded and deleted.
- `FullWeightSync`: save the full model into `root/step-N`, then `POST /reload_weights {path, version}`
  (`serve-policy`'s endpoint). For vLLM / SGLang servers the same hook maps to their weight-update APIs:
  see docs/scale-out.md.
- `NoSync`: the servers keep the weights they started with (the staleness guard then stops training).

The version is the trainer's step: rollouts sampled with version v and trained when the trainer is at
step t are `t - v` versions stale; `check_staleness` raises `StaleRolloutError` beyond the bound.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from treegrpo.errors import UserError
from treegrpo.policies.openai import api_base
from treegrpo.policies.routing import RoutedPolicy, parse_base_urls


class WeightSyncError(UserError):
    """A server refused or failed a weight update; the message names the server and its reason."""


class StaleRolloutError(UserError):
    """Rollouts were sampled by weights older than `trainer.max_staleness` versions."""


class WeightSync(Protocol):
    def sync(self, model: Any, step: int) -> int:
        """Make every server serve `model` as version `step`; return that version."""
        ...

    def follow(self, step: int) -> int:
        """On a process that did not sync (not the main one): point this process's policy at `step`."""
        ...


def post_json(url: str, body: Mapping[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    """POST a JSON body; the decoded reply, or WeightSyncError with the server's own message."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")
        try:
            err = json.loads(detail).get("error", {})
            detail = err.get("message", detail) if isinstance(err, dict) else str(err)
        except (ValueError, AttributeError):
            pass
        raise WeightSyncError(f"{url}: HTTP {e.code}: {str(detail).strip()[:300]}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        raise WeightSyncError(f"{url}: {getattr(e, 'reason', e)}") from None
    try:
        out = json.loads(raw) if raw.strip() else {}
    except ValueError:
        out = {}
    return out if isinstance(out, dict) else {}


def server_root(url: str) -> str:
    """`http://h:p/v1` → `http://h:p` (the non-/v1 endpoints live at the root)."""
    base = api_base(url)
    return base[: -len("/v1")] if base.endswith("/v1") else base


def save_atomically(model: Any, root: Path, step: int) -> Path:
    """`model.save_pretrained` into `root/step-NNNNNN` via a temporary dir renamed into place."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


class _ServerSync:
    def __init__(
        self,
        root: str | Path,
        base_urls: str | Sequence[str],
        policy: RoutedPolicy | None = None,
        keep_last: int = 2,
        timeout: float = 300.0,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.servers = [server_root(u) for u in parse_base_urls(base_urls)]
        self.policy = policy
        self.keep_last = keep_last
        self.timeout = timeout
        self.saved: list[tuple[int, Path]] = []
        self.version: int | None = None

    def _prune(self, unload: bool) -> None:
        while len(self.saved) > self.keep_last:
            step, path = self.saved.pop(0)
            if unload:
                for s in self.servers:
                    post_json(f"{s}/v1/unload_lora_adapter", {"lora_name": f"step-{step}"}, self.timeout)
            shutil.rmtree(path, ignore_errors=True)


class LoraSync(_ServerSync):
    """Save the LoRA adapter per step and have every server load it as `step-N` (vLLM convention)."""

    def sync(self, model: Any, step: int) -> int:
        if not hasattr(model, "peft_config"):
            raise WeightSyncError("policy.weight_sync: lora needs a LoRA (PEFT) model; use full")
        if self.version == step:
            return step
        path = save_atomically(model, self.root, step).resolve()
        name = f"step-{step}"
        for s in self.servers:
            post_json(f"{s}/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, self.timeout)
        self.saved.append((step, path))
        if self.policy is not None:
            self.policy.use_version(step, model_name=name)
        self._prune(unload=True)
        self.version = step
        return step

    def follow(self, step: int) -> int:
        if self.policy is not None:
            self.policy.use_version(step, model_name=f"step-{step}")
        self.version = step
        return step


class FullWeightSync(_ServerSync):
    """Save the full weights per step and have every server reload them.

    `api="treegrpo"`: `POST /reload_weights {path, version}` (serve-policy). `api="sglang"`: `POST
    /update_weights_from_disk {model_path}` (SGLang's reload-from-disk; the directory then also needs the
    tokenizer and config, which `save_pretrained` of a full model writes; not tested here: no GPU).
    """

    def __init__(self, *args: Any, api: str = "treegrpo", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if api not in ("treegrpo", "sglang"):
            raise ValueError(f"api must be 'treegrpo' or 'sglang', got {api!r}")
        self.api = api

    def sync(self, model: Any, step: int) -> int:
        if self.version == step:
            return step
        path = save_atomically(model, self.root, step).resolve()
        for s in self.servers:
            if self.api == "sglang":
                post_json(f"{s}/update_weights_from_disk", {"model_path": str(path)}, self.timeout)
                continue
            reply = post_json(f"{s}/reload_weights", {"path": str(path), "version": step}, self.timeout)
            got = reply.get("version")
            if got is not None and got != step:
                raise WeightSyncError(f"{s}/reload_weights: server reports version {got}, expected {step}")
        self.saved.append((step, path))
        if self.policy is not None:
            self.policy.use_version(step)
        self._prune(unload=False)
        self.version = step
        return step

    def follow(self, step: int) -> int:
        if self.policy is not None:
            self.policy.use_version(step)
        self.version = step
        return step


class NoSync:
    """Servers keep their starting weights (`policy.weight_sync: none`): versions stay where they were."""

    def __init__(self, version: int = 0) -> None:
        self.version = version

    def sync(self, model: Any, step: int) -> int:
        return self.version

    def follow(self, step: int) -> int:
        return self.version


def make_weight_sync(
    mode: str, model: Any, root: str | Path, base_urls: str | Sequence[str], policy: RoutedPolicy | None
) -> WeightSync:
    """`policy.weight_sync` → the hook (auto: lora for a PEFT model, else full)."""
    if mode == "auto":
        mode = "lora" if hasattr(model, "peft_config") else "full"
    if mode == "lora":
        return LoraSync(root, base_urls, policy)
    if mode == "full":
        return FullWeightSync(root, base_urls, policy)
    if mode == "none":
        return NoSync(policy.version if policy is not None else 0)
    raise UserError(f"policy.weight_sync: must be auto, lora, full or none; got {mode!r}")


def staleness(trainer_version: int, sampled_versions: Sequence[int]) -> int:
    """How many versions the oldest sampled step lags behind the weights being trained (0 = on-policy)."""
    return max(0, int(trainer_version) - min(sampled_versions)) if sampled_versions else 0


def check_staleness(trainer_version: int, sampled_versions: Sequence[int], max_staleness: int) -> int:
    """The staleness of a rollout; raises StaleRolloutError when it exceeds `max_staleness`."""
    lag = staleness(trainer_version, sampled_versions)
    if lag > max_staleness:
        raise StaleRolloutError(
            f"trainer.max_staleness: rollouts were sampled with weights {lag} versions old (version "
            f"{min(sampled_versions)}, trainer at {trainer_version}; bound {max_staleness}) — is weight "
            "sync reaching the servers (policy.weight_sync)?"
        )
    return lag


def logprob_mismatch(sampled: Any, recomputed: Any, mask: Any = None) -> float:
    """Mean |sampler − trainer| log-prob over the masked tokens (`train/logprob_mismatch`).

    Takes lists, arrays or CPU tensors of one shape, e.g. a packed batch's sampling-time `old_logprobs`,
    the trainer's recomputed ones and its `loss_mask`.
    """
    a = np.asarray(sampled, dtype=np.float64)
    b = np.asarray(recomputed, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"sampled log-probs have shape {a.shape} but recomputed ones {b.shape}")
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        a, b = a[m], b[m]
    return float(np.abs(a - b).mean()) if a.size else 0.0
