"""The training loop: prompts → tree rollout → advantages → packed batch → loss → optimizer.

One step samples forests for `prompts_per_step` prompts with the live policy, computes per-leaf
advantages, recomputes old log-probs with the trainer's model, then takes optimizer steps over
mini-batches of whole forests (a tree is never split). Each step is seeded from (seed, step), so a
resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from treegrpo.advantage import compute_advantages
from treegrpo.build import RunParts, build_run, reference_model
from treegrpo.checkpoint import TrainerState, latest_checkpoint, load_trainer_state, save_checkpoint
from treegrpo.config import Config
from treegrpo.errors import UserError
from treegrpo.granularity import granularity_metrics
from treegrpo.loss import LossConfig
from treegrpo.packing import PackedBatch, forward_logprobs, loss_token_totals, pack, packed_loss
from treegrpo.policies.hf import HFPolicy
from treegrpo.rewards import exact_match, extract_answer
from treegrpo.rollout import RolloutConfig, sample_forests
from treegrpo.run_log import MetricsLogger
from treegrpo.tree import Forest, Tree, leaf_arrays, write_jsonl


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps; the last good checkpoint is kept."""


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**31 - 1)


def data_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 424242]).permutation(n)


def batch_rows(rows: Sequence[dict[str, Any]], position: int, size: int, seed: int) -> list[dict[str, Any]]:
    """Rows [position, position + size) of the seeded epoch-by-epoch shuffled stream."""
    out = []
    n = len(rows)
    orders: dict[int, np.ndarray] = {}  # one permutation per epoch touched, not one per row
    for p in range(position, position + size):
        epoch, i = divmod(p, n)
        if epoch not in orders:
            orders[epoch] = data_order(n, seed, epoch)
        out.append(rows[int(orders[epoch][i])])
    return out


def make_policy(
    model: Any, tokenizer: Any, cfg: Config, greedy: bool, seed: int, training: bool = True
) -> Any:
    """The `policy.backend` policy over `model` (hf, vllm) or over a served copy of it (openai)."""
    pc = cfg.policy
    common = dict(
        top_p=pc.top_p, max_new_tokens=pc.max_new_tokens, greedy=greedy or pc.temperature == 0, seed=seed
    )
    max_ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if pc.backend == "openai":
        if training:
            raise UserError(
                "policy.backend: 'openai' samples from a separately served model that training cannot "
                "update; use it with `treegrpo eval`, and hf or vllm to train"
            )
        if not pc.base_url:
            raise UserError("policy.base_url: required when policy.backend is 'openai' (--base-url)")
        from treegrpo.policies.openai import OpenAIPolicy

        try:
            return OpenAIPolicy(
                pc.base_url,
                tokenizer,
                model=pc.api_model,
                temperature=pc.temperature,
                max_context=int(max_ctx) if max_ctx else None,
                timeout=pc.request_timeout if pc.request_timeout > 0 else 120.0,
                max_retries=pc.max_retries,
                entropy_topk=pc.entropy_topk,
                **common,
            )
        except ValueError as e:
            raise UserError(f"policy.base_url: {e}") from None
    if pc.backend == "vllm":
        import os

        from treegrpo.policies.vllm import VLLMPolicy, import_vllm

        import_vllm()  # fail with the install hint before writing anything
        path = Path(cfg.model.path) if cfg.model.path else None
        if path is not None and not path.is_dir():
            from treegrpo.pretrained import resolve_model_path

            path = resolve_model_path(cfg.model.path, cfg.cache_dir)
        if path is None:  # the tiny model lives only in memory: vLLM loads from disk, weights synced after
            path = Path(cfg.cache_dir) / "vllm-init" / f"{cfg.name}-{os.getpid()}"
            if not (path / "config.json").is_file():
                model.save_pretrained(path)
                tokenizer.save_pretrained(path)
        return VLLMPolicy.for_model(
            model,
            path,
            tokenizer,
            temperature=pc.temperature,
            entropy_topk=pc.entropy_topk,
            max_context=cfg.rollout.max_context_tokens or (int(max_ctx) if max_ctx else None),
            gpu_memory_utilization=pc.vllm_gpu_memory_utilization,
            dtype=cfg.model.dtype,
            engine_kwargs=pc.vllm_kwargs,
            **common,
        )
    return HFPolicy(model, tokenizer, temperature=max(pc.temperature, 1e-6), **common)


def group_ids_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [
        str(r.get("group_id") or f"{r.get('data_source', 'data')}/{r.get('index', i)}")
        for i, r in enumerate(rows)
    ]


def evaluate(
    policy: HFPolicy, env: Any, rows: Sequence[dict[str, Any]], batch_size: int = 64
) -> dict[str, float]:
    """Greedy decoding, one chain per question: exact match of the last <answer> and mean reward."""
    if not rows:
        return {}
    cfg = RolloutConfig(strategy="chain", num_generations=1)
    ems: list[float] = []
    rewards: list[float] = []
    searches: list[int] = []
    for s in range(0, len(rows), batch_size):
        chunk = list(rows[s : s + batch_size])
        result = sample_forests(chunk, group_ids_of(chunk), policy, env, cfg, np.random.default_rng(0))
        for row, forest in zip(chunk, result.forests, strict=True):
            tree = forest.trees[0]
            leaf = tree.leaves()[0]
            ems.append(exact_match(extract_answer(tree.response_text(leaf.id)), row["golden_answers"]))
            rewards.append(float(leaf.reward or 0.0))
            searches.append(sum(tree.nodes[i].action == "search" for i in tree.ancestors(leaf.id)))
    return {
        "eval/em": float(np.mean(ems)),
        "eval/reward_mean": float(np.mean(rewards)),
        "eval/searches_mean": float(np.mean(searches)),
        "eval/n": float(len(rows)),
    }


@dataclass
class _Micro:
    batch: PackedBatch
    ref_logprobs: torch.Tensor | None


def _split_trees(
    trees: list[Tree], advs: list[np.ndarray], parts: int
) -> list[tuple[list[Tree], list[float]]]:
    """Split whole trees into `parts` micro-batches (never splitting a tree).

    Trees are sorted by token count and cut into contiguous runs of equal total size, so each padded
    micro-batch holds trees of similar length (less padding, and the O(T^2) masks stay small).
    """
    parts = max(1, min(parts, len(trees)))
    sizes = [sum(len(n.all_ids) for n in t.nodes) for t in trees]
    order = sorted(range(len(trees)), key=lambda i: sizes[i])
    target = sum(sizes) / parts
    bins: list[list[int]] = [[]]
    acc = 0
    for i in order:
        if acc >= target * len(bins) and len(bins) < parts:
            bins.append([])
        bins[-1].append(i)
        acc += sizes[i]
    return [([trees[i] for i in b], [float(a) for i in b for a in advs[i]]) for b in bins if b]


def _attach_advantages(forests: list[Forest], adv: np.ndarray) -> list[np.ndarray]:
    """Per-tree advantage arrays (leaf order) and a copy in each tree's meta for the report."""
    per_tree: list[np.ndarray] = []
    k = 0
    for f in forests:
        for t in f.trees:
            leaves = t.leaves()
            a = adv[k : k + len(leaves)]
            k += len(leaves)
            per_tree.append(a)
            t.meta["advantages"] = {str(leaf.id): float(x) for leaf, x in zip(leaves, a, strict=True)}
    return per_tree


class Trainer:
    def __init__(self, cfg: Config, parts: RunParts, run_dir: Path) -> None:
        from accelerate import Accelerator

        self.cfg = cfg
        self.parts = parts
        self.run_dir = run_dir
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        tc = cfg.trainer
        # Multi-process (accelerate launch): each process samples and trains its own whole forests;
        # DDP averages gradients, and losses are normalized by global token/sequence counts.
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        if tc.prompts_per_step % self.world:
            raise UserError(
                f"trainer.prompts_per_step: {tc.prompts_per_step} is not divisible by the {self.world} processes"
            )
        self.model = parts.model
        self.ref_model = reference_model(self.model) if tc.beta > 0 else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay
        )
        total = max(tc.steps * self._updates_per_step(), 1)
        warm = tc.warmup_steps * self._updates_per_step()

        def lr_lambda(s: int) -> float:
            if warm and s < warm:
                return (s + 1) / warm
            if tc.lr_scheduler == "cosine":
                progress = min(1.0, (s - warm) / max(1, total - warm))
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.loss_cfg = LossConfig(
            epsilon=tc.epsilon,
            epsilon_high=tc.epsilon_high,
            clip_ratio_c=tc.clip_ratio_c if tc.clip_ratio_c > 1.0 else None,
            beta=tc.beta,
            kl_estimator=tc.kl_estimator,
            entropy_coeff=tc.entropy_coeff,
            loss_agg_mode=tc.loss_agg_mode,
            norm_length=cfg.policy.max_new_tokens * (cfg.env.max_turns + 1),
        )
        self.rollout_cfg = cfg.rollout
        if self.rollout_cfg.max_context_tokens is None:
            base = self.unwrapped
            self.rollout_cfg.max_context_tokens = int(getattr(base.config, "max_position_embeddings", 4096))
        # Log-probs are of softmax(logits / T) at the sampling temperature, in sampling and training alike.
        self.temperature = cfg.policy.temperature if cfg.policy.temperature > 0 else 1.0
        # One optimizer step per rollout: the weights that sampled are the weights that train, so the
        # old log-probs are the loss forward's own (detached) and need no extra forward.
        self.on_policy = tc.ppo_epochs == 1 and self._updates_per_step() == 1
        self.np_rng = np.random.default_rng(cfg.seed)
        self.policy = make_policy(self.unwrapped, parts.tokenizer, cfg, greedy=False, seed=cfg.seed)
        self.greedy = make_policy(self.unwrapped, parts.tokenizer, cfg, greedy=True, seed=cfg.seed)
        self.step = 0
        self.data_position = 0
        self.bad_steps = 0
        self.totals: dict[str, float] = {}

    @property
    def unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    def _updates_per_step(self) -> int:
        tc = self.cfg.trainer
        per_epoch = (
            1 if tc.mini_batch_prompts == 0 else math.ceil(tc.prompts_per_step / tc.mini_batch_prompts)
        )
        return per_epoch * tc.ppo_epochs

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Process 0 writes the checkpoint (weights are identical on every process); all wait for it."""
        path = None
        if self.accelerator.is_main_process:
            path = self._save()
        self.accelerator.wait_for_everyone()
        return path

    def _save(self) -> Path:
        return save_checkpoint(
            self.run_dir / "checkpoints",
            self.step,
            self.unwrapped,
            self.parts.tokenizer,
            self.optimizer,
            self.scheduler,
            self.np_rng,
            TrainerState(self.step, self.data_position, {"totals": self.totals}),
            keep_last=self.cfg.trainer.keep_last,
        )

    def resume(self) -> bool:
        ckpt = latest_checkpoint(self.run_dir / "checkpoints")
        if ckpt is None:
            return False
        load_weights(self.unwrapped, ckpt)
        state = load_trainer_state(ckpt, self.optimizer, self.scheduler, self.np_rng)
        self.step, self.data_position = state.step, state.data_position
        self.totals = dict(state.extra.get("totals", {}))
        return True

    # -- one step --------------------------------------------------------------------------------
    def _seed_step(self) -> None:
        s = step_seed(self.cfg.seed, self.step) + 7_777 * self.rank
        torch.manual_seed(s)
        self.policy.generator.manual_seed(s)

    def rollout(self) -> tuple[list[Forest], dict[str, Any], list[dict[str, Any]]]:
        tc = self.cfg.trainer
        rows = batch_rows(self.parts.train_rows, self.data_position, tc.prompts_per_step, self.cfg.seed)
        rows = rows[self.rank :: self.world]  # whole prompts per process: a forest is never split
        rng = np.random.default_rng([self.cfg.seed, self.step, 7, self.rank])
        result = sample_forests(rows, group_ids_of(rows), self.policy, self.parts.env, self.rollout_cfg, rng)
        return result.forests, result.budget, rows

    def _micro_batches(self, trees: list[Tree], advs: list[np.ndarray]) -> list[_Micro]:
        tc = self.cfg.trainer
        n_tok, n_seq = self._global_sum(loss_token_totals(trees))
        pad = self.parts.tokenizer.pad_token_id or 0
        micros: list[_Micro] = []
        for sub_trees, sub_adv in _split_trees(trees, advs, tc.gradient_accumulation_steps):
            batch = pack(
                sub_trees,
                sub_adv,
                packing=tc.packing,
                loss_agg_mode=tc.loss_agg_mode,
                norm_length=self.loss_cfg.norm_length,
                total_tokens=n_tok,
                total_sequences=n_seq,
                pad_id=pad,
            )
            with torch.no_grad():
                ref = None
                if self.loss_cfg.beta > 0:
                    if self.ref_model is not None:
                        ref, _ = forward_logprobs(
                            self.ref_model, batch, self.temperature, compute_entropy=False
                        )
                    else:
                        with self.unwrapped.disable_adapter():
                            ref, _ = forward_logprobs(
                                self.model, batch, self.temperature, compute_entropy=False
                            )
                if not self.on_policy:  # old log-probs recomputed by the trainer's own model
                    old, _ = forward_logprobs(self.model, batch, self.temperature, compute_entropy=False)
                    batch = batch.with_old_logprobs(old)
            micros.append(_Micro(batch, ref))
        return micros

    def train_on(self, forests: list[Forest], per_tree_adv: list[np.ndarray]) -> dict[str, float] | None:
        """Optimizer steps over mini-batches of whole forests. Returns None if a step went non-finite."""
        tc = self.cfg.trainer
        mb = tc.mini_batch_prompts or len(forests)
        tree_slices: list[tuple[list[Tree], list[np.ndarray]]] = []
        k = 0
        for s in range(0, len(forests), mb):
            trees, advs = [], []
            for f in forests[s : s + mb]:
                for t in f.trees:
                    trees.append(t)
                    advs.append(per_tree_adv[k])
                    k += 1
            tree_slices.append((trees, advs))
        self.model.train()
        prepared = [self._micro_batches(t, a) for t, a in tree_slices]
        sums: dict[str, float] = {}
        count = 0
        for _ in range(tc.ppo_epochs):
            for micros in prepared:
                self.optimizer.zero_grad(set_to_none=True)
                metrics_acc: dict[str, float] = {}
                for i, micro in enumerate(micros):
                    loss, m = packed_loss(
                        self.model,
                        micro.batch,
                        self.loss_cfg,
                        micro.ref_logprobs,
                        temperature=self.temperature,
                        on_policy=self.on_policy,
                    )
                    if not self._all_finite(loss):
                        self.optimizer.zero_grad(set_to_none=True)
                        return None
                    # DDP averages gradients over processes; the loss is already normalized by global
                    # counts, so scale by the world size to get the sum. Sync only on the last micro-batch.
                    last = i == len(micros) - 1
                    sync = (
                        contextlib.nullcontext()
                        if last or self.world == 1
                        else self.accelerator.no_sync(self.model)
                    )
                    with sync:
                        self.accelerator.backward(loss * self.world)
                    for key, v in m.items():
                        metrics_acc[key] = metrics_acc.get(key, 0.0) + float(v)
                    metrics_acc["loss"] = metrics_acc.get("loss", 0.0) + float(loss.detach())
                params = [p for p in self.model.parameters() if p.requires_grad]
                grad_norm = self.accelerator.clip_grad_norm_(
                    params, tc.max_grad_norm if tc.max_grad_norm > 0 else 1e30
                )
                if not torch.isfinite(grad_norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    return None
                self.optimizer.step()
                self.scheduler.step()
                metrics_acc["grad_norm"] = float(grad_norm)
                for key, v in metrics_acc.items():
                    sums[key] = sums.get(key, 0.0) + v
                count += 1
        return {k: v / max(count, 1) for k, v in sums.items()}

    def _global_sum(self, values: Sequence[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Every process must agree to skip, or the others would wait forever in the gradient all-reduce."""
        ok = float(bool(torch.isfinite(loss.detach())))
        return self._global_sum([ok])[0] == self.world

    def _reduce_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Budgets add up over processes; rates and losses are averaged (equal prompts per process)."""
        if self.world == 1:
            return metrics
        keys = sorted(k for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool))
        sums = self._global_sum([float(metrics[k]) for k in keys])
        for k, v in zip(keys, sums, strict=True):
            additive = k.startswith("budget/") and not k.startswith("budget/cum_") or k == "tools/failures"
            metrics[k] = v if additive else v / self.world
        return metrics

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._seed_step()
        forests, budget, rows = self.rollout()
        t_roll = time.perf_counter() - t0
        rewards, groups, tree_ids = leaf_arrays(forests)
        metrics: dict[str, Any] = {}
        r = np.asarray(rewards, dtype=np.float64)
        try:
            adv = compute_advantages(
                r, groups, tree_ids, self.cfg.advantage.estimator, self.cfg.advantage.eps
            )
        except ValueError as e:
            adv = None
            warnings.warn(f"step {self.step + 1}: {e}; update skipped", stacklevel=2)
        train_metrics = None
        if adv is not None and np.all(np.isfinite(adv)):
            per_tree = _attach_advantages(forests, adv)
            metrics.update(granularity_metrics(forests))
            train_metrics = self.train_on(forests, per_tree)
        if train_metrics is None:
            self.bad_steps += 1
            if adv is not None:  # (a non-finite reward was already reported above)
                warnings.warn(
                    f"step {self.step + 1}: non-finite advantage/loss/gradient; update skipped",
                    stacklevel=2,
                )
            metrics["train/skipped"] = 1.0
        else:
            self.bad_steps = 0
            metrics.update(
                {
                    "loss": train_metrics.get("loss"),
                    "pg_loss": train_metrics.get("pg_loss"),
                    "kl": train_metrics.get("kl", 0.0),
                    "entropy": train_metrics.get("entropy"),
                    "clipfrac": train_metrics.get("clipfrac", train_metrics.get("pg_clipfrac")),
                    "grad_norm": train_metrics.get("grad_norm"),
                }
            )
        ems = []
        for row, forest in zip(rows, forests, strict=True):
            for tree, leaf in forest.leaves():
                ems.append(exact_match(extract_answer(tree.response_text(leaf.id)), row["golden_answers"]))
        metrics.update(
            {
                "train/reward_mean": float(np.mean(r)) if r.size else 0.0,
                "train/reward_std": float(np.std(r)) if r.size else 0.0,
                "train/em": float(np.mean(ems)) if ems else 0.0,
                "train/adv_abs_mean": float(np.mean(np.abs(adv))) if adv is not None and adv.size else 0.0,
                "lr": float(self.scheduler.get_last_lr()[0]),
            }
        )
        budget = {k: v for k, v in budget.items() if isinstance(v, int | float)}
        if self.world > 1:
            keys = sorted(budget)
            budget = dict(zip(keys, self._global_sum([budget[k] for k in keys]), strict=True))
        metrics = self._reduce_metrics(metrics)
        for key in (
            "generated_tokens",
            "prefill_tokens",
            "prefill_tokens_no_reuse",
            "observation_tokens",
            "tool_calls",
            "tool_failures",
            "trajectories",
            "policy_calls",
            "trained_tokens_unique",
            "trained_tokens_total",
        ):
            if key in budget:
                metrics[f"budget/{key}"] = budget[key]
                self.totals[key] = self.totals.get(key, 0) + float(budget[key])
                metrics[f"budget/cum_{key}"] = self.totals[key]
        metrics["tools/failures"] = budget.get("tool_failures", 0)
        self.step += 1
        self.data_position += self.cfg.trainer.prompts_per_step
        metrics["time/rollout_seconds"] = t_roll
        metrics["time/step_seconds"] = time.perf_counter() - t0
        metrics["_forests"] = forests
        return metrics


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


def train(cfg: Config, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run `cfg` end to end; returns the final summary (also printed and saved as summary.json)."""
    from accelerate import PartialState
    from transformers.utils import logging as hf_logging

    from treegrpo.progress import RunProgress

    hf_logging.disable_progress_bar()
    state = PartialState(cpu=not torch.cuda.is_available())
    main = state.is_main_process  # under `accelerate launch` only process 0 logs, evaluates and saves
    run_dir = cfg.run_dir
    if run_dir.exists() and any(run_dir.glob("checkpoints/step-*")) and not resume:
        raise UserError(f"{run_dir}: a run with checkpoints exists; pass --resume or choose another name")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    ui = RunProgress(enabled=progress and main, quiet=not main)
    with ui:
        with state.main_process_first():  # process 0 builds the warm-start cache, the others load it
            parts = build_run(cfg, log=ui.log, on_sft_step=ui.sft_callback())
        trainer = Trainer(cfg, parts, run_dir)
        resumed = trainer.resume() if resume else False
        if resumed:
            ui.log(f"resumed from step {trainer.step}")
        logger = _Logger(run_dir, trainer.step if resumed else None, enabled=main)
        tc = cfg.trainer
        history: dict[str, Any] = {"warmstart": parts.warmstart}
        start_eval = None
        if tc.eval_every and parts.eval_rows and not resumed and main:
            ui.log(f"evaluating the starting model on {len(parts.eval_rows)} held-out questions")
            start_eval = evaluate(trainer.greedy, parts.env, parts.eval_rows)
            logger.log(0, {**start_eval, "budget/cum_generated_tokens": 0.0})
            ui.log(f"start: eval EM {start_eval['eval/em']:.3f}")
        state.wait_for_everyone()
        t_start = time.perf_counter()
        ui.start_training(tc.steps, trainer.step)
        last: dict[str, Any] = {}
        while trainer.step < tc.steps:
            metrics = trainer.train_step()
            forests = metrics.pop("_forests")
            step = trainer.step
            if main and tc.eval_every and parts.eval_rows and (step % tc.eval_every == 0 or step == tc.steps):
                metrics.update(evaluate(trainer.greedy, parts.env, parts.eval_rows))
            state.wait_for_everyone()
            if main and tc.save_trees_every and (step % tc.save_trees_every == 0 or step == 1):
                (run_dir / "trees").mkdir(exist_ok=True)
                write_jsonl(
                    [t for f in forests for t in f.trees], run_dir / "trees" / f"step-{step:06d}.jsonl"
                )
            logger.log(step, metrics)
            ui.update(step, metrics)
            last = metrics
            if trainer.bad_steps >= tc.max_bad_steps:
                logger.close()
                good = latest_checkpoint(run_dir / "checkpoints")
                raise TrainingDiverged(
                    f"stopped after {trainer.bad_steps} consecutive non-finite steps at step {step}; "
                    + (f"the last good checkpoint is {good}" if good else "no checkpoint was written")
                )
            # No periodic checkpoint inside a run of skipped steps: with keep_last it would prune the
            # last good checkpoint that TrainingDiverged points the user to.
            if tc.save_every and step % tc.save_every == 0 and step < tc.steps and trainer.bad_steps == 0:
                trainer.save()
        if tc.steps > 0:
            trainer.save()
        logger.close()
    summary = {
        "run_dir": str(run_dir),
        "steps": trainer.step,
        "train_seconds": time.perf_counter() - t_start,
        "eval_em_start": start_eval["eval/em"] if start_eval else None,
        "eval_em_end": last.get("eval/em"),
        "train_reward_last": last.get("train/reward_mean"),
        "generated_tokens": trainer.totals.get("generated_tokens"),
        "tool_calls": trainer.totals.get("tool_calls"),
        "trajectories": trainer.totals.get("trajectories"),
        **{
            f"warmstart_{k}": v
            for k, v in history["warmstart"].items()
            if k in ("cached", "seconds", "params")
        },
    }
    if main:
        from treegrpo.granularity import summarize_run
        from treegrpo.run_log import read_metrics

        shares = summarize_run(read_metrics(run_dir))
        summary.update(
            {k: v for k, v in shares.items() if "signal_share" in k or k.endswith("mean_branch_depth")}
        )
        _write_summary(run_dir, summary)
        ui.summary(summary)
    return summary


class _Logger:
    """metrics.jsonl + TensorBoard on the main process; a no-op on the others."""

    def __init__(self, run_dir: Path, resume_from_step: int | None, enabled: bool) -> None:
        self._log = MetricsLogger(run_dir, resume_from_step=resume_from_step) if enabled else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self._log is not None:
            self._log.log(step, metrics)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


def _write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    import json

    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def _model_for_cli(cfg: Config, checkpoint: str | None) -> tuple[RunParts, Any]:
    parts = build_run(cfg, log=lambda s: None)
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
        parts, ckpt = _model_for_cli(cfg, checkpoint)
        model, tok, env, eval_rows = parts.model, parts.tokenizer, parts.env, parts.eval_rows
    if not eval_rows:
        raise UserError("data.eval_path: no evaluation rows (set data.eval_path or use a built-in task)")
    policy = make_policy(model, tok, cfg, greedy=True, seed=cfg.seed, training=False)
    res = evaluate(policy, env, eval_rows)
    where = f"{policy.model_name} served at {policy.base_url}" if served else None
    print(f"model: {where or ckpt or 'warm-start / base model'}")
    for k, v in res.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return res


def rollout_cli(cfg: Config, out: str, num_prompts: int, checkpoint: str | None = None) -> None:
    parts, _ = _model_for_cli(cfg, checkpoint)
    rows = batch_rows(parts.train_rows, 0, num_prompts, cfg.seed)
    policy = make_policy(parts.model, parts.tokenizer, cfg, greedy=False, seed=cfg.seed, training=False)
    rcfg = cfg.rollout
    if rcfg.max_context_tokens is None:
        rcfg.max_context_tokens = int(getattr(parts.model.config, "max_position_embeddings", 4096))
    result = sample_forests(
        rows, group_ids_of(rows), policy, parts.env, rcfg, np.random.default_rng(cfg.seed)
    )
    rewards, groups, tree_ids = leaf_arrays(result.forests)
    adv = compute_advantages(rewards, groups, tree_ids, cfg.advantage.estimator, cfg.advantage.eps)
    _attach_advantages(result.forests, adv)
    trees = [t for f in result.forests for t in f.trees]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(trees, out)
    b = result.budget
    print(
        f"wrote {len(trees)} trees ({b.get('trajectories')} trajectories, {b.get('generated_tokens')} generated "
        f"tokens, {b.get('tool_calls')} tool calls) to {out}"
    )
