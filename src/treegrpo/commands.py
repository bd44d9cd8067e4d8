"""`treegrpo eval` and `treegrpo rollout`: a checkpoint (or the starting model) evaluated or sampled once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from treegrpo.advantage import compute_advantages
from treegrpo.build import RunParts, build_run
from treegrpo.checkpoint import latest_checkpoint, load_weights
from treegrpo.config import Config
from treegrpo.data import batch_rows, group_ids_of
from treegrpo.errors import UserError
from treegrpo.evaluation import evaluate
from treegrpo.policy_factory import make_policy
from treegrpo.rollout import sample_forests
from treegrpo.tree import leaf_arrays, write_jsonl
from treegrpo.update import attach_advantages


def model_for_cli(cfg: Config, checkpoint: str | None) -> tuple[RunParts, Any]:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    parts = build_run(cfg, log=lambda s: None, device=device)
    parts.model.to(device)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(cfg.run_dir / "checkpoints")
    if checkpoint and not Path(checkpoint).is_dir():
        raise UserError(f"--checkpoint: {checkpoint} is not a directory")
    if ckpt is not None:
        load_weights(parts.model, ckpt)
    return parts, ckpt


def evaluate_cli(cfg: Config, checkpoint: str | None = None) -> dict[str, float]:
    served = cfg.policy.backend == "openai"
    if served and checkpoint:
        raise UserError("--checkpoint: not used with --backend openai (the server holds the weights)")
    if served and cfg.model.path:
        # A served model needs only its tokenizer here: do not load billions of weights onto the CPU.
        from types import SimpleNamespace

        from transformers import AutoConfig, AutoTokenizer

        from treegrpo.build import build_env, build_retriever, load_data
        from treegrpo.pretrained import resolve_model_path

        task, _, eval_rows = load_data(cfg)
        path = str(resolve_model_path(cfg.model.path, cfg.cache_dir))
        tok = AutoTokenizer.from_pretrained(path)
        model: Any = SimpleNamespace(config=AutoConfig.from_pretrained(path))
        env, ckpt = build_env(cfg, build_retriever(cfg, task), tok), None
    else:
        parts, ckpt = model_for_cli(cfg, checkpoint)
        model, tok, env, eval_rows = parts.model, parts.tokenizer, parts.env, parts.eval_rows
    if not eval_rows:
        raise UserError("data.eval_path: no evaluation rows (set data.eval_path or use a built-in task)")
    policy = make_policy(model, tok, cfg, greedy=True, seed=cfg.seed)
    res = evaluate(policy, env, eval_rows)
    where = f"{policy.model_name} served at {policy.base_url}" if served else None
    print(f"model: {where or ckpt or 'warm-start / base model'}")
    for k, v in res.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return res


def rollout_cli(cfg: Config, out: str, num_prompts: int, checkpoint: str | None = None) -> None:
    parts, _ = model_for_cli(cfg, checkpoint)
    if num_prompts > len(parts.train_rows):
        raise UserError(f"--prompts: {num_prompts} is more than the {len(parts.train_rows)} training rows")
    rows = batch_rows(parts.train_rows, 0, num_prompts, cfg.seed)
    policy = make_policy(parts.model, parts.tokenizer, cfg, greedy=False, seed=cfg.seed)
    rcfg = cfg.rollout
    if rcfg.max_context_tokens is None:
        rcfg.max_context_tokens = int(getattr(parts.model.config, "max_position_embeddings", 4096))
    result = sample_forests(
        rows, group_ids_of(rows), policy, parts.env, rcfg, np.random.default_rng(cfg.seed)
    )
    rewards, groups, tree_ids = leaf_arrays(result.forests)
    adv = compute_advantages(rewards, groups, tree_ids, cfg.advantage.estimator, cfg.advantage.eps)
    attach_advantages(result.forests, adv)
    trees = [t for f in result.forests for t in f.trees]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(trees, out)
    b = result.budget
    print(
        f"wrote {len(trees)} trees ({b.get('trajectories')} trajectories, {b.get('generated_tokens')} generated "
        f"tokens, {b.get('tool_calls')} tool calls) to {out}"
    )
