"""Assemble a run from its config: data, retriever, environment, tokenizer, model, warm start.

This is the outermost layer (it does I/O and caching); the algorithm modules never import it.
The quickstart's tokenizer and warm-started model, and a pretrained model's warm start, are cached
under `cache_dir`, keyed by every setting that shapes them, so a second run starts in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from treegrpo.config import Config
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


def build_retriever(cfg: Config, task: Any) -> Any:
    rc = cfg.env.retriever
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
    if cfg.env.name == "search_r1":
        from treegrpo.envs.search_r1 import SearchR1Env

        return SearchR1Env(
            retriever,
            max_turns=cfg.env.max_turns,
            topk=cfg.env.topk,
            max_obs_tokens=cfg.env.max_obs_tokens,
            reward_fn=cfg.env.reward,
            tokenizer=tokenizer,
            template=cfg.env.template or None,
        )
    from treegrpo.plugins import load_object

    env_cls = load_object(cfg.env.name)
    try:
        return env_cls(retriever=retriever, tokenizer=tokenizer, **cfg.env.kwargs)
    except TypeError as e:
        raise UserError(f"env.name: could not construct {cfg.env.name} ({e})") from None


def _cache_key(cfg: Config) -> str:
    blob = json.dumps(
        {
            "v": 2,
            "task": cfg.data.task,
            "task_kwargs": cfg.data.task_kwargs,
            "model": asdict(cfg.model),
            "warmstart": asdict(cfg.warmstart),
            "env": {k: v for k, v in asdict(cfg.env).items() if k != "retriever"},
            "seed": cfg.seed,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tokenizer_texts(task: Any, env: Any) -> list[str]:
    """Everything the quickstart model will read or write: corpus, prompts, demonstrations."""
    texts = [f"{d.get('title', '')} {d.get('text', '')}" for d in task.corpus]
    for row in task.train_rows + task.eval_rows:
        texts.append(" ".join(m["content"] for m in env.build_prompt(row["question"])))
        texts.append(" ".join(str(a) for a in row["golden_answers"]))
    for demo in task.demonstrations(n=len(task.train_rows), early_stop_prob=0.5):
        texts.extend(demo.steps)
    if hasattr(env, "render_observation"):
        texts.append(env.render_observation([], failed=True))
        texts.append(env.render_observation([]))
    from treegrpo.envs.search_r1 import INVALID_ACTION_OBS

    texts.append(INVALID_ACTION_OBS)
    return texts


def build_tiny_from_task(
    cfg: Config, task: Any, retriever: Any, log: Callable[[str], None], on_sft_step: Any = None
) -> tuple[Any, Any, dict[str, Any]]:
    """Tokenizer trained on the task + tiny model, warm-started by SFT; cached on disk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from treegrpo.models import tiny_causal_lm
    from treegrpo.sft import warm_start
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
    tok = train_tokenizer(_tokenizer_texts(task, text_env), kind=cfg.model.tokenizer)
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
    ws = cfg.warmstart
    if ws.enabled and ws.num_demos > 0 and ws.epochs > 0:
        demos = task.demonstrations(n=ws.num_demos, early_stop_prob=ws.early_stop_prob, seed=cfg.seed)
        log(f"warm start: SFT on {len(demos)} demonstrations ({ws.epochs} epochs)")
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
        info["sft"] = stats.to_dict()
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
    if not cfg.model.path and not torch.cuda.is_available():
        # A sub-million-parameter model gains nothing from a second CPU thread and loses a lot when
        # the machine is busy (threads wait on each other at every small op).
        torch.set_num_threads(1)
    task, train_rows, eval_rows = load_data(cfg)
    if not train_rows:
        raise UserError("data: the training set is empty")
    retriever = build_retriever(cfg, task)
    if cfg.model.path:
        model, tok = load_pretrained(cfg)
        if device is not None:
            model.to(device)
        info: dict[str, Any] = {}
        ws = cfg.warmstart
        if ws.enabled and ws.num_demos > 0 and ws.epochs > 0 and task is not None:
            # SFT of the pretrained model (its LoRA adapter, when enabled) on the task's oracle
            # demonstrations, so it learns the tag protocol before RL; cached like the tiny model's.
            from treegrpo.pretrained import resolve_model_path
            from treegrpo.pretrained_warmstart import (
                cached_warm_start,
                load_cached,
                save_warm_start,
                warm_start_pretrained,
            )

            cache = Path(cfg.cache_dir) / "warmstart" / _cache_key(cfg)
            if cached_warm_start(cache):
                model, info = load_cached(cfg, cache, resolve_model_path(cfg.model.path, cfg.cache_dir))
                if device is not None:
                    model.to(device)
                log(f"warm start: loaded cached model from {cache}")
            else:
                info = warm_start_pretrained(
                    cfg, model, tok, build_env(cfg, retriever, tok), task, log, on_sft_step
                )
                save_warm_start(model, cache, info)
    else:
        if task is None:
            raise UserError(
                "model.path: required when training on your own data (the tiny model needs a built-in task)"
            )
        model, tok, info = build_tiny_from_task(cfg, task, retriever, log, on_sft_step)
    env = build_env(cfg, retriever, tok)
    return RunParts(model, tok, env, train_rows, eval_rows, task, info)
