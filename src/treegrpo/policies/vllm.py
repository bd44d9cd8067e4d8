"""A `Policy` on vLLM: token ids in, token ids and log-probs out, prefix caching, colocated with the trainer.

Optional (`pip install treegrpo[vllm]`, GPU only); `vllm` is imported when a policy is constructed, and
without it construction raises a one-line `UserError`.

- Token-in/token-out: each context goes in as `TokensPrompt(prompt_token_ids=ids)`; the step is the
  engine's output token ids, with the log-prob of each sampled token (`logprobs=1`). A stop tag may end
  inside a token: vLLM stops on the detokenized text but keeps the whole token in `token_ids`, and we trust
  the ids (the step's text is our own decoding of them), exactly the rule `HFPolicy` follows.
- `enable_prefix_caching=True`: tree expansions re-send their parent's full context, and vLLM's block-level
  prefix cache serves the shared prefix from KV computed once. `prefill_tokens` is the context length
  minus the request's `num_cached_tokens` where the engine reports it.
- Colocated weights: the engine is built from a model directory, then `sync_weights(model)` pushes the
  trainer's (LoRA-merged) weights into it through the model's own `load_weights`, and resets the prefix
  cache (its KV was computed by the old weights). With `live_model=` the policy syncs by itself before a
  `generate` whenever a parameter changed since the last push (tensor versions bump on optimizer steps),
  so weights follow every optimizer step with one push per rollout. The in-process path needs the engine
  core in this process: we set `VLLM_ENABLE_V1_MULTIPROCESSING=0` unless the user set it.
- Log-probs: vLLM returns raw log-probs (temperature 1, before top-p) by default — what the trainer
  recomputes at temperature 1. At another temperature we ask for `logprobs_mode="processed_logprobs"`
  where this vLLM has it (after temperature; also after top-p truncation when top_p < 1). The trainer
  never trains on these numbers: it recomputes old log-probs with its own model.
- Entropies are not returned by vLLM. With `entropy_topk=k > 0` we request the top-k log-probs and report
  the truncated-distribution entropy (a lower bound; see `openai.topk_entropy`); by default they are empty.
"""

from __future__ import annotations

import dataclasses
import os
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from treegrpo.errors import UserError
from treegrpo.policies.openai import DEFAULT_STOP, SeedBox, encode_chat, topk_entropy
from treegrpo.protocols import Prompt, StepSample, triage_contexts

INSTALL_HINT = (
    "policy.backend: vllm needs the optional extra: pip install 'treegrpo[vllm]' (a CUDA GPU machine)"
)


class VLLMUnavailable(UserError):
    """vLLM is missing, or this vLLM offers no way to reach the engine's model for a weight push."""


def import_vllm() -> Any:
    """The `vllm` module, or a one-line UserError saying how to get it."""
    try:
        import vllm
    except ImportError as e:
        raise VLLMUnavailable(f"{INSTALL_HINT} ({e})") from None
    return vllm


def _clean_name(name: str) -> str:
    """A PEFT / wrapper parameter name → the base checkpoint's name."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
    return name.replace(".base_layer.", ".")


def engine_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF checkpoint name, tensor) pairs of `model` as vLLM's `load_weights` expects them.

    LoRA layers are merged on the fly (base weight + each active adapter's delta) without touching the
    model: merging in place and unmerging after would drift the base weights by rounding at every push.
    LoRA factors and PEFT's frozen `original_module` copies are skipped; `base_model.model.`, `.base_layer`
    and `modules_to_save.<adapter>` are stripped, so names are the base checkpoint's. Accelerate/DDP
    wrappers (`.module`) are unwrapped.
    """
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    merged: dict[str, torch.Tensor] = {}
    for mod_name, mod in model.named_modules():
        base = getattr(mod, "base_layer", None)
        if base is None or not hasattr(mod, "get_delta_weight") or getattr(mod, "merged", False):
            continue
        weight = base.weight.detach()
        adapters = getattr(mod, "active_adapters", None) or []
        if not getattr(mod, "disable_adapters", False):
            for a in adapters:
                if a in getattr(mod, "lora_A", {}):
                    weight = weight + mod.get_delta_weight(a).to(weight.dtype)
        merged[f"{mod_name}.base_layer.weight"] = weight
    for name, tensor in model.state_dict().items():
        if "lora_" in name or ".original_module." in name:
            continue
        yield _clean_name(name), merged.get(name, tensor).detach()


def _engine_model(llm: Any) -> Any | None:
    """The engine's torch model when it lives in this process (vLLM V1 in-process, or V0), else None."""
    paths = (
        ("llm_engine", "model_executor", "driver_worker", "worker", "model_runner", "model"),  # V1
        ("llm_engine", "model_executor", "driver_worker", "model_runner", "model"),  # V0
    )
    for path in paths:
        obj = llm
        for attr in path:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None and hasattr(obj, "load_weights"):
            return obj
    return None


def push_weights(llm: Any, weights: Sequence[tuple[str, torch.Tensor]]) -> str:
    """Load `weights` into the engine; returns the route used. Raises VLLMUnavailable if none works."""
    target = _engine_model(llm)
    if target is not None:
        target.load_weights(weights=iter(weights))
        route = "in-process model_runner.model.load_weights"
    elif hasattr(llm, "collective_rpc"):
        cpu = [(n, t.to("cpu")) for n, t in weights]  # crosses a process boundary: plain CPU tensors

        def _load(worker: Any) -> None:
            worker.model_runner.model.load_weights(weights=iter(cpu))

        llm.collective_rpc(_load)
        route = "collective_rpc worker.model_runner.model.load_weights"
    else:
        raise VLLMUnavailable(
            "this vLLM version exposes neither the in-process engine model nor LLM.collective_rpc; "
            "cannot push trainer weights (set VLLM_ENABLE_V1_MULTIPROCESSING=0 or use a vLLM >= 0.8)"
        )
    reset = getattr(llm, "reset_prefix_cache", None)
    if callable(reset):
        reset()  # cached KV was computed by the old weights
    return route


def _params_fingerprint(model: Any) -> tuple[tuple[int, int], ...]:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


@dataclasses.dataclass
class _Engine:
    """One vLLM engine shared by every policy view (sampling, greedy) of the same live model."""

    llm: Any
    path: str
    fingerprint: tuple[tuple[int, int], ...] | None = None
    syncs: int = 0
    route: str = ""


_ENGINES: weakref.WeakKeyDictionary[Any, _Engine] = weakref.WeakKeyDictionary()


class VLLMPolicy:
    """Batched token-level sampling with a vLLM engine (implements `protocols.Policy`)."""

    def __init__(
        self,
        model_path: str | Path,
        tokenizer: Any = None,
        *,
        live_model: Any = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        greedy: bool = False,
        stop_strings: Sequence[str] = DEFAULT_STOP,
        max_context: int | None = None,
        seed: int = 0,
        entropy_topk: int = 0,
        gpu_memory_utilization: float = 0.5,
        dtype: str = "auto",
        engine_kwargs: Mapping[str, Any] | None = None,
        _engine: _Engine | None = None,
    ) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if entropy_topk < 0:
            raise ValueError(f"entropy_topk must be >= 0, got {entropy_topk}")
        self.vllm = import_vllm()
        if tokenizer is None or isinstance(tokenizer, str | Path):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer or model_path))
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.greedy = greedy or temperature == 0
        self.stop_strings = tuple(stop_strings)
        self.entropy_topk = int(entropy_topk)
        self.live_model = live_model
        self.generator = SeedBox(seed)
        self.stats = {"prefill_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "calls": 0}
        if _engine is None:
            _engine = self._build_engine(
                str(model_path), max_context, gpu_memory_utilization, dtype, engine_kwargs
            )
        self.engine = _engine
        cfg_len = getattr(getattr(self.engine.llm, "llm_engine", None), "model_config", None)
        self.max_context = int(max_context or getattr(cfg_len, "max_model_len", 0) or 1 << 30)
        if live_model is not None:
            self._maybe_sync()

    @classmethod
    def for_model(cls, live_model: Any, model_path: str | Path, tokenizer: Any, **kwargs: Any) -> VLLMPolicy:
        """A policy view on the engine already built for `live_model` (one engine per model), or a new one."""
        engine = _ENGINES.get(live_model)
        if engine is not None:
            for k in ("gpu_memory_utilization", "dtype", "engine_kwargs"):
                kwargs.pop(k, None)
            return cls(engine.path, tokenizer, live_model=live_model, _engine=engine, **kwargs)
        pol = cls(model_path, tokenizer, live_model=live_model, **kwargs)
        _ENGINES[live_model] = pol.engine
        return pol

    def _build_engine(
        self,
        path: str,
        max_context: int | None,
        gpu_memory_utilization: float,
        dtype: str,
        engine_kwargs: Mapping[str, Any] | None,
    ) -> _Engine:
        if not Path(path).is_dir():
            raise UserError(f"model.path: {path} is not a model directory (vLLM loads weights from disk)")
        # Colocated: keep the engine core in this process so `sync_weights` can reach its model.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs: dict[str, Any] = {
            "model": path,
            "tokenizer": path,
            "enable_prefix_caching": True,
            "gpu_memory_utilization": gpu_memory_utilization,
            "dtype": dtype,
            "seed": self.generator.seed,
        }
        if max_context:
            kwargs["max_model_len"] = int(max_context)
        if self.temperature not in (0, 1) and self._engine_has("logprobs_mode"):
            kwargs["logprobs_mode"] = "processed_logprobs"
        kwargs.update(engine_kwargs or {})
        try:
            llm = self.vllm.LLM(**kwargs)
        except TypeError as e:
            raise UserError(f"policy.vllm_kwargs: this vLLM rejects an engine argument ({e})") from None
        return _Engine(llm=llm, path=path)

    def _engine_has(self, name: str) -> bool:
        try:
            from vllm.engine.arg_utils import EngineArgs
        except ImportError:
            return False
        return name in getattr(EngineArgs, "__dataclass_fields__", {})

    # -- weights ------------------------------------------------------------------------------------
    def sync_weights(self, model: Any | None = None) -> str:
        """Push `model`'s weights (default: the live model) into the engine; returns the route used."""
        model = model if model is not None else self.live_model
        if model is None:
            raise ValueError("sync_weights needs a model (none given and no live_model)")
        with torch.no_grad():
            weights = list(engine_weights(model))
            self.engine.route = push_weights(self.engine.llm, weights)
        self.engine.syncs += 1
        if model is self.live_model:
            self.engine.fingerprint = _params_fingerprint(model)
        return self.engine.route

    def _maybe_sync(self) -> None:
        if self.live_model is not None and _params_fingerprint(self.live_model) != self.engine.fingerprint:
            self.sync_weights(self.live_model)

    # -- protocol -----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return encode_chat(self.tokenizer, prompt)

    def encode_observation(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _params(self, seed: int, budget: int, stops: tuple[str, ...]) -> Any:
        kw: dict[str, Any] = {
            "n": 1,
            "max_tokens": budget,
            "temperature": 0.0 if self.greedy else self.temperature,
            "top_p": 1.0 if self.greedy else self.top_p,
            "stop": list(stops),
            "include_stop_str_in_output": True,
            "logprobs": max(1, self.entropy_topk),
            "skip_special_tokens": False,
        }
        if not self.greedy:
            kw["seed"] = seed
        return self.vllm.SamplingParams(**kw)

    def generate(
        self, contexts: Sequence[Sequence[int]], stop: Sequence[str] | None = None
    ) -> list[StepSample]:
        """Continue every context by one agent step in one engine call.

        `stop` (an environment's `stop_strings`) replaces the policy's own stop strings for this call.
        """
        self._maybe_sync()
        stops = self.stop_strings if stop is None else tuple(str(s) for s in stop if s)
        from vllm.inputs import TokensPrompt

        out, work = triage_contexts(contexts, self.max_context)
        seeds = self.generator.request_seeds(len(contexts))
        if work:
            prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in contexts[i]]) for i in work]
            params = [
                self._params(seeds[i], min(self.max_new_tokens, self.max_context - len(contexts[i])), stops)
                for i in work
            ]
            results = self.engine.llm.generate(prompts, params, use_tqdm=False)
            for i, res in zip(work, results, strict=True):
                out[i] = self._sample(res, len(contexts[i]))
        self.stats["calls"] += 1
        return [o for o in out if o is not None]

    def _sample(self, res: Any, ctx_len: int) -> StepSample:
        comp = res.outputs[0]
        ids = [int(t) for t in comp.token_ids]
        lps: list[float] = []
        ents: list[float] = []
        for pos, tok in enumerate(ids):
            d = comp.logprobs[pos] if comp.logprobs is not None and pos < len(comp.logprobs) else None
            entry = d.get(tok) if d is not None else None
            lps.append(float(entry.logprob) if entry is not None else float("nan"))
            if self.entropy_topk and d is not None:
                ents.append(topk_entropy([float(v.logprob) for v in d.values()]))
        if any(x != x for x in lps):  # NaN: the engine did not report the sampled token's log-prob
            raise RuntimeError("vLLM returned no log-prob for a sampled token; is logprobs >= 1 honoured?")
        cached = getattr(res, "num_cached_tokens", None)
        cached = int(cached) if isinstance(cached, int) else 0
        self.stats["cached_tokens"] += cached
        self.stats["prefill_tokens"] += ctx_len - cached
        self.stats["generated_tokens"] += len(ids)
        return StepSample(
            token_ids=ids,
            logprobs=lps,
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            entropies=ents,
            prefill_tokens=ctx_len - cached,
        )


__all__ = ["VLLMPolicy", "VLLMUnavailable", "engine_weights", "import_vllm", "push_weights"]
