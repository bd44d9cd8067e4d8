"""Assemble a run from its config: data, retriever, environment, tokenizer, model, warm start.

This is the outermost layer (it does I/O and caching); the algorithm modules never import it.
The quickstart's tokenizer and warm-started model, and a pretrained model's warm start, are cached
under `cache_dir`, keyed by every setting that shapes them, so a second run starts in seconds.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from treegrpo.config import Config, EnvConfig
from treegrpo.errors import UserError
from treegrpo.protocols import Environment


@dataclass
class RunParts:
    """Everything the trainer needs, built from a config."""

    model: Any
    tokenizer: Any
    env: Environment
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    task: Any = None
    warmstart: dict[str, Any] = field(default_factory=dict)


def load_data(cfg: Config) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    """(task or None, train rows, eval rows) from a dataset path or a built-in task."""
    from treegrpo.data import load_rows

    import_plugins(cfg)
    if cfg.data.train_path:
        train = load_rows(cfg.data.train_path)
        evals = load_rows(cfg.data.eval_path)[: cfg.data.eval_size] if cfg.data.eval_path else []
        return None, train, evals
    from treegrpo.tasks import build_task

    try:
        task = build_task(cfg.data.task, **cfg.data.task_kwargs)
    except ImportError as e:
        raise UserError(f"data.task: {cfg.data.task} needs a package that is not installed ({e})") from None
    except ValueError as e:
        raise UserError(f"data.task: {e}") from None
    evals = task.eval_rows
    if cfg.data.eval_path:
        evals = load_rows(cfg.data.eval_path)
    return task, task.train_rows, evals[: cfg.data.eval_size]


def import_plugins(cfg: Config) -> None:
    """Import the plug-in modules the config names before tasks are resolved (a plug-in may
    `register_task`); a bad path is one line naming it."""
    from treegrpo.envs import ENVS
    from treegrpo.plugins import load_object
    from treegrpo.rewards import REWARDS

    for field_name, value, known in (
        ("env.name", cfg.env.name, ENVS),
        ("env.reward", cfg.env.reward, REWARDS),
    ):
        if value in known:
            continue
        if ":" not in value and "." not in value:
            raise UserError(
                f"{field_name}: unknown {value!r}; built-ins: {', '.join(sorted(known))}, or 'pkg.module:Name'"
            )
        load_object(value)


def _accepts(factory: Any, name: str) -> bool:
    """Does `factory(...)` take a keyword `name` (by name or through **kwargs)?"""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _names(factory: Any, name: str) -> bool:
    """Does `factory` name the parameter `name` explicitly (not only through **kwargs)?"""
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def env_uses_retriever(cfg: Config) -> bool:
    """Only environments that search get a retriever (and need a corpus)."""
    if cfg.env.name == "search_r1":
        return True
    if cfg.env.name == "tools":
        from treegrpo.envs.tools import uses_search

        return uses_search(cfg.env.kwargs.get("tools", []))
    from treegrpo.plugins import load_object

    return _names(load_object(cfg.env.name), "retriever")


def build_retriever(cfg: Config, task: Any) -> Any:
    """The configured retriever, or None for an environment that never searches.

    A plug-in that takes a `retriever` argument gets one when a source is configured (a corpus, a
    server URL or a built-in task's corpus), else None.
    """
    rc = cfg.env.retriever
    if not env_uses_retriever(cfg):
        return None
    if cfg.env.name not in ("search_r1", "tools") and rc.kind == "bm25" and not rc.corpus and task is None:
        return None
    if rc.kind == "http":
        from treegrpo.retrievers import HTTPRetriever, RetrieverError

        if rc.timeout <= 0:
            raise UserError(
                f"env.retriever.timeout: must be > 0 seconds for an http retriever, got {rc.timeout}"
            )
        try:
            retriever = HTTPRetriever(rc.url, timeout=rc.timeout, max_retries=rc.max_retries)
        except ValueError as e:
            raise UserError(f"env.retriever.url: {e}") from None
        try:  # fail fast at start-up; during training a failure only becomes an observation
            retriever.search(["connectivity check"], 1)
        except RetrieverError as e:
            raise UserError(f"env.retriever.url: {rc.url} is unreachable ({e})") from None
        return retriever
    from treegrpo.retrievers import BM25Retriever

    if rc.corpus:
        if not Path(rc.corpus).is_file():
            raise UserError(f"env.retriever.corpus: {rc.corpus} does not exist")
        return BM25Retriever(corpus_path=rc.corpus, cache_dir=cfg.cache_dir)  # index cached there
    if task is None:
        raise UserError("env.retriever.corpus: required when training on your own data with a bm25 retriever")
    return BM25Retriever(docs=task.corpus)


def build_env(cfg: Config, retriever: Any, tokenizer: Any) -> Environment:
    """The configured environment: a built-in by name or a plug-in by import path."""
    if cfg.env.name == "search_r1":
        from treegrpo.envs.search_r1 import SearchR1Env

        env: Any = SearchR1Env(
            retriever,
            max_turns=cfg.env.max_turns,
            topk=cfg.env.topk,
            max_obs_tokens=cfg.env.max_obs_tokens,
            reward_fn=cfg.env.reward,
            tokenizer=tokenizer,
            template=cfg.env.template or None,
        )
    elif cfg.env.name == "tools":
        from treegrpo.envs.tools import tools_env_from_config

        env = tools_env_from_config(cfg, retriever, tokenizer)
    else:
        env = _build_plugin_env(cfg, retriever, tokenizer)
    from treegrpo.protocols import env_stop_strings

    try:
        env_stop_strings(env)
    except ValueError as e:
        raise UserError(f"env.name: {cfg.env.name}: {e}") from None
    return env


def _build_plugin_env(cfg: Config, retriever: Any, tokenizer: Any) -> Any:
    from treegrpo.plugins import load_object

    env_cls = load_object(cfg.env.name)
    if not callable(env_cls):
        raise UserError(f"env.name: {cfg.env.name} is not a class or factory")
    kwargs = dict(cfg.env.kwargs)
    for name, value in (("retriever", retriever), ("tokenizer", tokenizer)):
        if name not in kwargs and _accepts(env_cls, name):
            kwargs[name] = value
    if cfg.env.reward != EnvConfig().reward:
        if not _names(env_cls, "reward_fn"):
            raise UserError(
                f"env.reward: {cfg.env.name} takes no reward_fn argument, so env.reward="
                f"{cfg.env.reward} would be ignored; drop env.reward or add a reward_fn parameter"
            )
        from treegrpo.rewards import get_reward

        kwargs["reward_fn"] = get_reward(cfg.env.reward)
    try:
        env = env_cls(**kwargs)
    except TypeError as e:
        raise UserError(f"env.name: could not construct {cfg.env.name} ({e})") from None
    missing = [m for m in ("start", "step", "reward") if not callable(getattr(env, m, None))]
    if missing:
        raise UserError(
            f"env.name: {cfg.env.name} has no {', '.join(missing)} method(s); an environment needs "
            "start(row), step(states, actions) and reward(state)"
        )
    return env


def _file_digest(path: str) -> str:
    if not path or not Path(path).exists():
        return ""
    p = Path(path)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _cache_key(cfg: Config) -> str:
    blob = {
        "v": 2,
        "task": cfg.data.task,
        "task_kwargs": cfg.data.task_kwargs,
        "model": asdict(cfg.model),
        "warmstart": asdict(cfg.warmstart),
        "env": {k: v for k, v in asdict(cfg.env).items() if k != "retriever"},
        "seed": cfg.seed,
    }
    if cfg.data.train_path or cfg.warmstart.demos_path:  # your own data: keyed by the files' contents
        blob["files"] = [
            _file_digest(x)
            for x in (
                cfg.data.train_path,
                cfg.data.eval_path,
                cfg.warmstart.demos_path,
                cfg.env.retriever.corpus,
            )
        ]
    del blob["warmstart"]["demos_path"]  # where the file lives does not matter, its contents do
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prompt_text(prompt: Any) -> str:
    if prompt and all(isinstance(m, dict) for m in prompt):
        return "\n".join(str(m.get("content", "")) for m in prompt)
    return ""


def _tokenizer_texts(
    task: Any, env: Any, rows: list[dict[str, Any]], replays: list[Any], retriever: Any
) -> list[str]:
    """Everything the tiny model will read or write: corpus, prompts, demonstrations, observations."""
    if task is not None:  # the built-in task's texts, unchanged (the quickstart's tokenizer stays the same)
        texts = [f"{d.get('title', '')} {d.get('text', '')}" for d in task.corpus]
        for row in task.train_rows + task.eval_rows:
            prompt = env.build_prompt(row["question"]) if hasattr(env, "build_prompt") else env.start(row)[1]
            texts.append(_prompt_text(prompt))
            texts.append(" ".join(str(a) for a in row["golden_answers"]))
        from treegrpo.demos import with_steps

        for demo in with_steps(task.demonstrations(n=len(task.train_rows), early_stop_prob=0.5), env):
            texts.extend(demo["steps"] if isinstance(demo, dict) else demo.steps)
    else:
        docs = getattr(retriever, "docs", None) or []
        texts = [f"{d.get('title', '')} {d.get('text', '')}" for d in docs]
        for row in rows:
            texts.append(_prompt_text(env.start(row)[1]))
            texts.append(" ".join(str(a) for a in row["golden_answers"]))
    for rep in replays:
        texts.append(_prompt_text(rep.prompt))
        for st in rep.steps:
            texts.extend([st.text, st.observation])
    if hasattr(env, "render_observation"):
        texts.append(env.render_observation([], failed=True))
        texts.append(env.render_observation([]))
    if callable(getattr(env, "tokenizer_texts", None)):
        texts.extend(str(t) for t in env.tokenizer_texts())
    from treegrpo.envs.search_r1 import INVALID_ACTION_OBS

    texts.append(INVALID_ACTION_OBS)
    return texts


def demonstrations_for(cfg: Config, task: Any, env: Any, log: Callable[[str], None]) -> list[Any] | None:
    """The warm start's demonstrations, or None after one line saying why there are none."""
    ws = cfg.warmstart
    if not ws.enabled:
        return None
    if ws.num_demos == 0 or ws.epochs == 0:
        log("warm start: skipped (warmstart.num_demos or warmstart.epochs is 0)")
        return None
    if ws.demos_path:
        from treegrpo.demos import load_demonstrations

        return load_demonstrations(ws.demos_path, env, limit=ws.num_demos)
    if task is not None:
        from treegrpo.demos import with_steps

        return with_steps(
            task.demonstrations(n=ws.num_demos, early_stop_prob=ws.early_stop_prob, seed=cfg.seed), env
        )
    log(
        "warm start: skipped: your own data has no demonstrations; set warmstart.demos_path to a jsonl "
        "of demonstrations (see README, Demonstrations), or warmstart.enabled=false to silence this"
    )
    return None


def _warm_start(
    cfg: Config, model: Any, tok: Any, env: Any, demos: list[Any], log: Any, on_sft_step: Any, what: str
) -> dict[str, Any]:
    from treegrpo.sft import warm_start

    ws = cfg.warmstart
    log(f"warm start: SFT of {what} on {len(demos)} demonstrations ({ws.epochs} epochs)")
    try:
        stats = warm_start(
            model,
            tok,
            env,
            demos,
            epochs=ws.epochs,
            lr=ws.lr,
            batch_size=ws.batch_size,
            seed=cfg.seed,
            on_step=on_sft_step,
        )
    except ValueError as e:
        raise UserError(f"warmstart: {e}") from None
    return {"sft": stats.to_dict(), "seconds": stats.seconds}


def build_tiny(
    cfg: Config,
    task: Any,
    rows: list[dict[str, Any]],
    retriever: Any,
    log: Callable[[str], None],
    on_sft_step: Any = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Tokenizer trained on the task or your own data + tiny model, warm-started by SFT; cached on disk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from treegrpo.models import tiny_causal_lm
    from treegrpo.sft import replay
    from treegrpo.tokenizer import train_tokenizer

    cache = Path(cfg.cache_dir) / "warmstart" / _cache_key(cfg)
    if (cache / "config.json").is_file() and (cache / "warmstart.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(cache))
        model = AutoModelForCausalLM.from_pretrained(
            str(cache), attn_implementation=cfg.model.attn_implementation
        )
        info = json.loads((cache / "warmstart.json").read_text())
        info["cached"] = True
        log(f"warm start: loaded cached model from {cache}")
        return model, tok, info
    t0 = time.perf_counter()
    text_env = build_env(cfg, retriever, None)
    # a demos file's steps and real observations are texts the tokenizer must cover (a task's are in its texts)
    text_demos = (
        demonstrations_for(cfg, task, text_env, log=lambda _: None) if cfg.warmstart.demos_path else None
    )
    replays = replay(text_env, text_demos) if text_demos else []
    texts = _tokenizer_texts(task, text_env, rows, replays, retriever)
    extra = list(text_env.tokenizer_tokens()) if callable(getattr(text_env, "tokenizer_tokens", None)) else []
    tok = train_tokenizer(texts, kind=cfg.model.tokenizer, extra_tokens=extra)
    env = build_env(cfg, retriever, tok)
    model = tiny_causal_lm(
        tok,
        arch=cfg.model.arch,
        hidden=cfg.model.hidden_size,
        layers=cfg.model.num_layers,
        heads=cfg.model.num_heads,
        seed=cfg.seed,
        attn_implementation=cfg.model.attn_implementation,
    )
    info: dict[str, Any] = {"cached": False, "params": sum(p.numel() for p in model.parameters())}
    demos = demonstrations_for(cfg, task, env, log)
    if demos:
        info.update(_warm_start(cfg, model, tok, env, demos, log, on_sft_step, "the tiny model"))
    info["seconds"] = time.perf_counter() - t0
    tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "warmstart.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
    return model, tok, info


def load_pretrained(cfg: Config) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from treegrpo.pretrained import resolve_model_path

    path = resolve_model_path(cfg.model.path, cfg.cache_dir)
    dtype = getattr(torch, cfg.model.dtype)
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=cfg.model.attn_implementation
    )
    if cfg.model.lora:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=cfg.model.lora_r,
            lora_alpha=cfg.model.lora_alpha,
            lora_dropout=cfg.model.lora_dropout,
            target_modules=list(cfg.model.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
    return model, tok


def build_run(
    cfg: Config,
    log: Callable[[str], None] = print,
    on_sft_step: Any = None,
    device: torch.device | str | None = None,
) -> RunParts:
    """Data, retriever, environment, tokenizer and model; a pretrained model is moved to `device`
    (with fp32 master weights for what trains) before its warm start, so the warm start runs there."""
    torch.manual_seed(cfg.seed)
    if not cfg.model.path and not torch.cuda.is_available() and cfg.trainer.packing == "path":
        # The tiny model decodes on one thread whatever this says (policies/hf.py, per call). Its training
        # gains from every core with `tree` / `leaf` packing (2 vs 1 thread on 2 busy cores, quickstart
        # shape: 1.5x faster), but `path` packing is many small calls where threads only wait (6x slower).
        torch.set_num_threads(1)
    task, train_rows, eval_rows = load_data(cfg)
    if not train_rows:
        raise UserError("data: the training set is empty")
    retriever = build_retriever(cfg, task)
    if cfg.model.path:
        model, tok = load_pretrained(cfg)
        from treegrpo.precision import autocast, compute_dtype, model_device, upcast_trainable

        if device is not None:
            model.to(device)
        info: dict[str, Any] = {}
        # SFT of the pretrained model (its LoRA adapter, when enabled) on demonstrations, so it learns
        # the environment's protocol before RL; cached like the tiny model's (LoRA: the adapter only).
        env = build_env(cfg, retriever, tok)
        demos = demonstrations_for(cfg, task, env, log)
        if demos:
            from treegrpo.pretrained import resolve_model_path
            from treegrpo.pretrained_warmstart import cached_warm_start, load_cached, save_warm_start

            cache = Path(cfg.cache_dir) / "warmstart" / _cache_key(cfg)
            if cached_warm_start(cache):
                model, info = load_cached(cfg, cache, resolve_model_path(cfg.model.path, cfg.cache_dir))
                if device is not None:
                    model.to(device)
                log(f"warm start: loaded cached model from {cache}")
            else:
                upcast_trainable(model)  # the warm start trains: fp32 master weights, compute in model.dtype
                with autocast(model_device(model), compute_dtype(cfg.model.dtype)):
                    sft = _warm_start(cfg, model, tok, env, demos, log, on_sft_step, cfg.model.path)
                info = {"cached": False, **sft}
                save_warm_start(model, cache, info)
    else:
        model, tok, info = build_tiny(cfg, task, train_rows + eval_rows, retriever, log, on_sft_step)
    env = build_env(cfg, retriever, tok)
    return RunParts(model, tok, env, train_rows, eval_rows, task, info)
