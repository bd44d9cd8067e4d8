"""The model behind `treegrpo serve-policy`: one `HFPolicy`, its adapters and its weight version.

The HTTP layer (`policy_server.py`) validates requests and turns them into `SamplingParams`; this module
does the work, one generation at a time behind a lock, on one long-lived `HFPolicy` so its prefix KV cache
survives between requests. That is what makes sticky routing pay off: the siblings of a tree node share
their whole context, so after the first sibling only one token per sibling is prefilled.

Versions: the engine serves the base weights under `name` at `version` (0, or the checkpoint's step), and
LoRA adapters loaded at run time under their own names (vLLM's convention: a request's `model` names the
adapter). `reload_weights` replaces the full weights from a checkpoint directory and bumps the version.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treegrpo.errors import UserError
from treegrpo.policies.hf import HFPolicy
from treegrpo.protocols import StepSample

_STEP_NAME = re.compile(r"(?:^|[-_])(\d+)$")


class EngineError(UserError):
    """A request the engine cannot serve; `status` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SamplingParams:
    """One completion request, already validated."""

    prompts: list[list[int]]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    model: str = ""  # the served name, or a loaded adapter's name

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one batched generate call."""
        return (self.max_tokens, self.temperature, self.top_p, self.stop, self.model)


class _Slot:
    """A request waiting for the engine, and then its answer."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.done = False
        self.result: list[Completion] = []
        self.error: Exception | None = None


@dataclass
class Completion:
    """One sampled continuation and what serving it cost."""

    sample: StepSample
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache (not recomputed)
    version: int


def version_of_name(name: str, default: int) -> int:
    """`step-12` → 12 (the trainer's adapter names); anything else → `default`."""
    m = _STEP_NAME.search(name)
    return int(m.group(1)) if m else default


def checkpoint_step(path: Path) -> int | None:
    """The step recorded in a treegrpo checkpoint's trainer_state.json, if there is one."""
    meta = path / "trainer_state.json"
    try:
        return int(json.loads(meta.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class PolicyEngine:
    """Serves one model (and its run-time LoRA adapters) with a persistent prefix cache."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str = "treegrpo",
        version: int = 0,
        prefix_cache_tokens: int = 32768,
        max_context: int | None = None,
        max_batch_rows: int = 64,
    ) -> None:
        self.model = model
        self.max_batch_rows = max_batch_rows
        self._queue: list[_Slot] = []
        self._queue_lock = threading.Lock()
        self.tokenizer = tokenizer
        self.name = name
        self.version = int(version)
        self.prefix_cache_tokens = prefix_cache_tokens
        self.adapters: dict[str, int] = {}  # run-time adapter name -> version
        # A LoRA model as `train` builds it serves its own adapter under the base name.
        self._base_adapter: str | None = (
            getattr(model, "active_adapter", None) if hasattr(model, "peft_config") else None
        )
        self._own_wrap = False  # True when the PeftModel wrapper was made here (unwrapped on last unload)
        self._active: str | None = None  # adapter the weights currently compute with (None = base)
        self._seed_counter = 0
        self.lock = threading.Lock()
        counters = ("requests", "batches", "prompt_tokens", "cached_tokens", "generated_tokens", "reloads")
        self.stats = dict.fromkeys((*counters, "adapter_loads"), 0)
        self._stop_masks: dict[tuple[str, ...], Any] = {}
        self.policy = self._new_policy()
        # HFPolicy.generate(contexts, stop=...) where available: no need to reconfigure the policy per request
        self._per_call_stop = "stop" in inspect.signature(HFPolicy.generate).parameters
        self.max_context = max_context or self.policy.max_context
        self.vocab_size = self.policy._vocab_size()

    def _new_policy(self) -> HFPolicy:
        return HFPolicy(
            self.model, self.tokenizer, prefix_cache_tokens=self.prefix_cache_tokens, stop_strings=()
        )

    # -- generation ---------------------------------------------------------------------------------
    def served_names(self) -> list[str]:
        return [self.name, *self.adapters]

    def version_for(self, model: str) -> int:
        if not model or model == self.name:
            return self.version
        if model in self.adapters:
            return self.adapters[model]
        raise EngineError(f"The model `{model}` does not exist.", status=404)

    def generate(self, params: SamplingParams) -> list[Completion]:
        """Sample every prompt of the request; concurrent compatible requests are batched together.

        A request waits for the engine; whoever holds it next takes every waiting request with the same
        sampling settings (up to `max_batch_rows` prompts) into one batched `HFPolicy.generate` call. A
        request that runs alone is reproducible from its `seed`; in a shared batch the first request's seed
        seeds the batch.
        """
        slot = _Slot(params)
        with self._queue_lock:
            self._queue.append(slot)
        with self.lock:
            if not slot.done:
                self._run_batch(self._take_batch(slot))
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _take_batch(self, lead: _Slot) -> list[_Slot]:
        """`lead` plus the waiting requests it can share a batch with (oldest first, bounded rows)."""
        key = lead.params.batch_key()
        batch, rows = [lead], len(lead.params.prompts)
        with self._queue_lock:
            self._queue.remove(lead)
            for s in list(self._queue):
                n = len(s.params.prompts)
                if s.params.batch_key() == key and rows + n <= self.max_batch_rows:
                    batch.append(s)
                    rows += n
                    self._queue.remove(s)
        return batch

    def _run_batch(self, batch: list[_Slot]) -> None:
        """Run `batch` (engine lock held); every slot gets its results or the error."""
        lead = batch[0].params
        try:
            version = self.version_for(lead.model)
            self._activate(None if not lead.model or lead.model == self.name else lead.model)
            pol = self.policy
            pol.greedy = lead.temperature == 0.0
            pol.temperature = 1.0 if pol.greedy else lead.temperature
            pol.top_p = lead.top_p
            pol.max_new_tokens = lead.max_tokens
            kw: dict[str, Any] = {}
            if self._per_call_stop:
                kw["stop"] = lead.stop
            else:
                self._set_stops(lead.stop)
            seed = lead.seed
            if seed is None:
                self._seed_counter += 1
                seed = self._seed_counter
            pol.generator.manual_seed(int(seed))
            prompts = [p for s in batch for p in s.params.prompts]
            samples = iter(pol.generate(prompts, **kw))
        except Exception as e:  # noqa: BLE001 - handed to every waiting request
            for s in batch:
                s.error, s.done = e, True
            return
        for s in batch:
            out = []
            for prompt in s.params.prompts:
                smp = next(samples)
                cached = len(prompt) - int(smp.prefill_tokens) if smp.token_ids else 0
                out.append(Completion(smp, len(prompt), max(cached, 0), version))
            s.result, s.done = out, True
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += sum(c.prompt_tokens for c in out)
            self.stats["cached_tokens"] += sum(c.cached_tokens for c in out)
            self.stats["generated_tokens"] += sum(len(c.sample.token_ids) for c in out)
        self.stats["batches"] += 1

    def _set_stops(self, stops: tuple[str, ...]) -> None:
        """Point the shared HFPolicy at this request's stop strings (their token masks are cached)."""
        pol = self.policy
        if pol.stop_strings == stops:
            return
        self._stop_masks[pol.stop_strings] = pol._stop_ids
        pol.stop_strings = stops
        pol._window = max([16, *(len(s) + 2 for s in stops)])
        pol._stop_ids = self._stop_masks.get(stops)

    # -- adapters -----------------------------------------------------------------------------------
    def _activate(self, adapter: str | None) -> None:
        """Make `adapter` (None = base weights) the one the model computes with; drop KV of the other."""
        if adapter == self._active:
            return
        target = adapter if adapter is not None else self._base_adapter
        if hasattr(self.model, "set_adapter"):
            self._set_lora_enabled(target is not None)
            if target is not None:
                self.model.set_adapter(target)
        self._active = adapter
        self.policy.clear_cache()

    def _set_lora_enabled(self, enabled: bool) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(enabled)

    def load_adapter(self, name: str, path: str) -> int:
        """Load a LoRA adapter directory under `name`; its version comes from the name (`step-N`)."""
        if not name or name == self.name:
            raise EngineError(f"lora_name: must be a new name other than the base model's ({self.name!r})")
        src = Path(path)
        if not (src / "adapter_config.json").is_file():
            raise EngineError(f"lora_path: {path} is not a LoRA adapter directory (no adapter_config.json)")
        with self.lock:
            if name in self.adapters:
                raise EngineError(f"The lora adapter '{name}' has already been loaded.")
            try:
                if hasattr(self.model, "load_adapter") and hasattr(self.model, "peft_config"):
                    self.model.load_adapter(str(src), adapter_name=name)
                else:
                    from peft import PeftModel

                    self.model = PeftModel.from_pretrained(self.model, str(src), adapter_name=name)
                    self._own_wrap = True
                    self.policy = self._new_policy()
            except (ValueError, KeyError, RuntimeError, OSError) as e:
                raise EngineError(f"lora_path: cannot load {path}: {str(e).splitlines()[0]}") from None
            self.model.eval()
            self.adapters[name] = version_of_name(name, len(self.adapters) + 1)
            self.stats["adapter_loads"] += 1
            self._active = "\0"  # force re-activation on the next request
            return self.adapters[name]

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise EngineError(f"The lora adapter '{name}' cannot be found.", status=404)
            del self.adapters[name]
            if self._own_wrap and not self.adapters:
                self.model = self.model.unload()  # back to the plain base model
                self._own_wrap = False
                self.policy = self._new_policy()
            else:
                if self._active == name:
                    self._activate(None)
                with warnings.catch_warnings():  # peft notes which adapter it makes active instead
                    warnings.simplefilter("ignore", UserWarning)
                    self.model.delete_adapter(name)
            self._active = "\0"

    # -- full weights -------------------------------------------------------------------------------
    def reload_weights(self, path: str, version: int | None = None) -> int:
        """Load full weights (or the training adapter) from a checkpoint dir in place; bump the version."""
        from treegrpo.checkpoint import load_weights  # the same formats `train` writes

        src = Path(path)
        if not src.is_dir():
            raise EngineError(f"path: {path} is not a directory")
        with self.lock:
            try:
                load_weights(self.model, src)
            except UserError as e:
                raise EngineError(f"path: {e}") from None
            except (ValueError, RuntimeError, OSError) as e:
                raise EngineError(f"path: cannot load {path}: {str(e).splitlines()[0]}") from None
            step = checkpoint_step(src)
            self.version = int(
                version if version is not None else step if step is not None else self.version + 1
            )
            self.policy.clear_cache()
            self.stats["reloads"] += 1
            return self.version

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (vLLM's `/reset_prefix_cache`): benchmarks start each run cold."""
        with self.lock:
            self.policy.clear_cache()

    def health(self) -> dict[str, Any]:
        s = dict(self.stats)
        hit = s["cached_tokens"] / s["prompt_tokens"] if s["prompt_tokens"] else 0.0
        return {
            "status": "ok",
            "model": self.name,
            "version": self.version,
            "adapters": dict(self.adapters),
            "prefix_reuse_tokens": s["cached_tokens"],
            "prefill_tokens": s["prompt_tokens"] - s["cached_tokens"],
            "prefix_hit": hit,
            **s,
        }
