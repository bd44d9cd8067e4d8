"""The training loop. One RL step, top to bottom (`Trainer.train_step`):

    rows     = this rank's share of the step's prompts (data.batch_rows, dealt round-robin)
    forests  = tree rollout with the live policy          (rollout.sample_forests)
    adv      = per-leaf advantages                        (advantage.compute_advantages)
    minis    = global mini-batches of packed micro-batches (update.plan_mini_batches / pack_mini_batches)
    old, ref = trainer and reference log-probs, no grad   (update.score_micro_batches)
    metrics  = update(...)                                (update.update: the optimizer steps)

Each step is seeded from (seed, step), so a resumed run reproduces the uninterrupted one. Several
processes (torchrun) each sample and train their own whole forests; `DistContext` owns every collective.
With `trainer.async_rollouts: 1` (server backends) the rollout of step t+1 is sampled on a background
thread, with the weights of step t, while step t trains (`served_training.OneStepOffRollouts`).
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from treegrpo.advantage import compute_advantages
from treegrpo.build import RunParts, build_run
from treegrpo.checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    save_checkpoint,
)
from treegrpo.config import Config
from treegrpo.data import batch_rows, group_ids_of
from treegrpo.diagnostics import SignalWarnings, signal_diagnostics
from treegrpo.distributed import DistContext
from treegrpo.errors import UserError
from treegrpo.evaluation import evaluate
from treegrpo.granularity import granularity_metrics
from treegrpo.loss import LossConfig
from treegrpo.packing import pack
from treegrpo.policy_factory import make_policy
from treegrpo.precision import autocast, compute_dtype, upcast_trainable
from treegrpo.reference import reference_model
from treegrpo.rewards import exact_match, extract_answer
from treegrpo.rollout import sample_forests
from treegrpo.run_log import MetricsLogger
from treegrpo.served_training import OneStepOffRollouts, ServedTraining, StoppablePolicy
from treegrpo.tree import Forest, leaf_arrays, write_jsonl
from treegrpo.update import (
    NonFiniteWeights,
    Scoring,
    UpdateConfig,
    attach_advantages,
    pack_mini_batches,
    plan_mini_batches,
    score_micro_batches,
    update,
    updates_per_step,
)


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps; the last good checkpoint is kept."""


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**31 - 1)


_BUDGET_KEYS = (
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
)


class StepRollout(NamedTuple):
    forests: list[Forest]
    budget: dict[str, Any]
    rows: list[dict[str, Any]]
    seconds: float  # sampling time (on the background thread for a one-step-off rollout)


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The policy on its device with fp32 master weights for every trainable parameter."""
    model.to(device)
    upcast_trainable(model)
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute decoder-layer activations in the backward (transformers' own, non-reentrant, so LoRA
    with frozen inputs gets gradients). Active only in train mode: scoring and generation are unchanged."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise UserError(
            f"trainer.gradient_checkpointing: {type(base).__name__} does not support gradient checkpointing"
        )
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class Trainer:
    def __init__(self, cfg: Config, parts: RunParts, run_dir: Path, dist: DistContext | None = None) -> None:
        self.cfg = cfg
        self.parts = parts
        self.run_dir = run_dir
        self.dist = dist or DistContext.from_environment()
        tc = cfg.trainer
        if tc.prompts_per_step % self.world:
            raise UserError(
                f"trainer.prompts_per_step: {tc.prompts_per_step} is not divisible by the {self.world} processes"
            )
        if len(parts.train_rows) < tc.prompts_per_step:
            raise UserError(
                f"trainer.prompts_per_step: {tc.prompts_per_step} prompts per step need as many distinct "
                f"training rows; the training set has {len(parts.train_rows)}"
            )
        self.compute_dtype = compute_dtype(cfg.model.dtype)
        if self.compute_dtype == torch.float16:
            raise UserError(
                "model.dtype: float16 training needs loss scaling, which the trainer does not do; use "
                "bfloat16 (fp32 master weights, bf16 compute) or float32"
            )
        # Placement first, then the reference: a copy of the placed (and warm-started) policy.
        self.model = place_model(parts.model, self.dist.device)
        if tc.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.dist.broadcast_parameters(self.model)  # every rank starts from rank 0's weights
        warm = "sft" in (parts.warmstart or {})
        self.ref_model = reference_model(self.model, warm, self.compute_dtype) if tc.beta > 0 else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay
        )
        self.updates_per_step = updates_per_step(tc.prompts_per_step, tc.mini_batch_prompts, tc.ppo_epochs)
        total = max(tc.steps * self.updates_per_step, 1)
        warm_updates = tc.warmup_steps * self.updates_per_step

        def lr_lambda(s: int) -> float:
            if warm_updates and s < warm_updates:
                return (s + 1) / warm_updates
            if tc.lr_scheduler == "cosine":
                progress = min(1.0, (s - warm_updates) / max(1, total - warm_updates))
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
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
            self.rollout_cfg.max_context_tokens = int(
                getattr(self.model.config, "max_position_embeddings", 4096)
            )
        # Log-probs are of softmax(logits / T) at the sampling temperature, in sampling and training alike.
        self.temperature = cfg.policy.temperature if cfg.policy.temperature > 0 else 1.0
        # One optimizer step per rollout: the weights that sampled are the weights that train, so the
        # old log-probs are the loss forward's own (detached) and need no extra forward.
        self.on_policy = self.updates_per_step == 1
        self.np_rng = np.random.default_rng(cfg.seed)
        self.policy = make_policy(self.model, parts.tokenizer, cfg, greedy=False, seed=cfg.seed)
        self.greedy = make_policy(self.model, parts.tokenizer, cfg, greedy=True, seed=cfg.seed)
        # Served rollouts (policy.backend openai): weight sync after each update, the staleness guard.
        self.served = ServedTraining.from_config(
            cfg, self.model, self.policy, run_dir, followers=[self.greedy]
        )
        self.step = 0
        self.data_position = 0
        self.bad_steps = 0
        self.totals: dict[str, float] = {}
        self.signal_warnings = SignalWarnings(every=10)
        # One-step-off rollouts: a background thread samples step t+1 on the servers while step t trains.
        self.ahead: OneStepOffRollouts[StepRollout] | None = None
        if tc.async_rollouts:
            self.ahead = OneStepOffRollouts(self.sample_step, last_step=tc.steps - 1)
            self._ahead_policy = StoppablePolicy(self.policy, self.ahead.stop)

    def close(self) -> None:
        """Stop the background rollout thread (a no-op in sync mode)."""
        if self.ahead is not None:
            self.ahead.close()

    @property
    def world(self) -> int:
        return self.dist.world

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def unwrapped(self) -> Any:
        return self.model

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Process 0 writes the checkpoint (weights are identical on every process); all wait for it."""
        path = None
        if self.dist.is_main:
            path = save_checkpoint(
                self.run_dir / "checkpoints",
                self.step,
                self.model,
                self.parts.tokenizer,
                self.optimizer,
                self.scheduler,
                self.np_rng,
                TrainerState(self.step, self.data_position, {"totals": self.totals}),
                keep_last=self.cfg.trainer.keep_last,
            )
        self.dist.barrier()
        return path

    def resume(self) -> bool:
        ckpt = latest_checkpoint(self.run_dir / "checkpoints")
        if ckpt is None:
            return False
        load_weights(self.model, ckpt)
        state = load_trainer_state(ckpt, self.optimizer, self.scheduler, self.np_rng)
        self.step, self.data_position = state.step, state.data_position
        self.totals = dict(state.extra.get("totals", {}))
        return True

    # -- one RL step ---------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._seed_step()
        pps = self.cfg.trainer.prompts_per_step
        if self.ahead is None:
            rollout = self.sample_step(self.step, self.data_position, self.policy)
        else:  # prefetched during the previous step (sampled now after a resume or at the first step)
            rollout = self.ahead.get(self.step, self.data_position, self._ahead_policy)
        forests, budget, rows = rollout.forests, rollout.budget, rollout.rows
        t_wait = time.perf_counter() - t0
        metrics: dict[str, Any] = {}
        if self.served is not None:  # staleness guard: raises beyond trainer.max_staleness
            metrics.update(self.served.rollout_metrics(trainer_version=self.step))
        if self.ahead is not None:  # nothing in flight above: the versions and counters are this step's
            self.ahead.prefetch(self.step + 1, self.data_position + pps, self._ahead_policy)
        rewards, groups, tree_ids = leaf_arrays(forests)
        r = np.asarray(rewards, dtype=np.float64)
        adv = self.advantages(r, groups, tree_ids)
        # Every rank takes the same branch (a rank alone skipping would leave the others waiting).
        if self.dist.all_true(adv is not None and bool(np.all(np.isfinite(adv)))):
            per_tree = attach_advantages(forests, adv)
            metrics.update(granularity_metrics(forests))
            train_metrics = self.train_on(forests, per_tree)
        else:
            train_metrics = self._skip_updates()
        metrics.update(self._train_metrics(train_metrics, adv is not None))
        metrics.update(self._rollout_metrics(forests, rows, r, adv, budget))
        fmt = getattr(self.parts.env, "format_valid", None)
        metrics.update(signal_diagnostics(forests, self.cfg.policy.max_new_tokens, fmt))
        metrics = self._mean_over_ranks(metrics)
        if self.dist.is_main and (why := self.signal_warnings.check(metrics)):
            warnings.warn(f"step {self.step + 1}: {why}", stacklevel=2)
        self.step += 1
        self.data_position += pps
        if self.ahead is not None:  # the next step's rollout saw only the weights it started with
            t_wait += self.ahead.wait(self.step)
        if self.served is not None:  # the servers sample the next step with the weights just made
            self.sync_servers(self.served.after_update)
            metrics["train/policy_version"] = float(self.served.policy.version)
        metrics["time/rollout_seconds"] = rollout.seconds
        if self.ahead is not None:
            metrics["time/rollout_wait_seconds"] = t_wait
        metrics["time/step_seconds"] = time.perf_counter() - t0
        metrics["_forests"] = forests
        return metrics

    def sync_servers(self, hook: Any) -> None:
        """Run a weight-sync hook: the main process pushes the weights, the others follow its version."""
        if self.dist.is_main:
            hook(self.model, self.step)
        self.dist.barrier()
        if not self.dist.is_main:
            hook(self.model, self.step, is_main=False)

    def _seed_step(self) -> None:
        torch.manual_seed(self._step_seed(self.step))

    def _step_seed(self, step: int) -> int:
        return step_seed(self.cfg.seed, step) + 7_777 * self.rank

    def rollout(self) -> tuple[list[Forest], dict[str, Any], list[dict[str, Any]]]:
        """This step's forests, budget and rows, sampled now with the live policy."""
        r = self.sample_step(self.step, self.data_position, self.policy)
        return r.forests, r.budget, r.rows

    def sample_step(self, step: int, position: int, policy: Any) -> StepRollout:
        """Forests of step `step` for this rank's prompts (the step's global batch, starting at data
        `position`, dealt round-robin over ranks). A function of (seed, step, rank, position) only, so it
        may run on the one-step-off thread."""
        t0 = time.perf_counter()
        tc = self.cfg.trainer
        rows = batch_rows(self.parts.train_rows, position, tc.prompts_per_step, self.cfg.seed)
        rows = rows[self.rank :: self.world]  # whole prompts per process: a forest is never split
        if hasattr(policy, "generator"):
            policy.generator.manual_seed(self._step_seed(step))
        rng = np.random.default_rng([self.cfg.seed, step, 7, self.rank])
        with autocast(self.dist.device, self.compute_dtype):
            result = sample_forests(rows, group_ids_of(rows), policy, self.parts.env, self.rollout_cfg, rng)
        return StepRollout(result.forests, result.budget, rows, time.perf_counter() - t0)

    def advantages(self, rewards: np.ndarray, groups: Any, tree_ids: Any) -> np.ndarray | None:
        try:
            return compute_advantages(
                rewards, groups, tree_ids, self.cfg.advantage.estimator, self.cfg.advantage.eps
            )
        except ValueError as e:
            warnings.warn(f"step {self.step + 1}: {e}; update skipped", stacklevel=2)
            return None

    def train_on(self, forests: list[Forest], per_tree_adv: list[np.ndarray]) -> dict[str, float]:
        """Packed micro-batches → old / reference log-probs → optimizer steps, for this rank's forests.

        `forests` are this rank's (global prompt `rank + j·world` is local forest j).
        """
        tc = self.cfg.trainer
        groups = plan_mini_batches(
            len(forests), self.rank, self.world, tc.prompts_per_step, tc.mini_batch_prompts
        )
        pack_fn = partial(
            _pack,
            packing=tc.packing,
            max_tokens_per_row=tc.max_tokens_per_row,
            logits_chunk=tc.logits_chunk,
            loss_agg_mode=tc.loss_agg_mode,
            norm_length=self.loss_cfg.norm_length,
            pad_id=self.parts.tokenizer.pad_token_id or 0,
        )
        minis = pack_mini_batches(
            forests, per_tree_adv, groups, tc.gradient_accumulation_steps, pack_fn, self.dist
        )
        scoring = Scoring(
            temperature=self.temperature,
            beta=self.loss_cfg.beta,
            recompute_old=not self.on_policy,
            tis_cap=tc.tis_cap,
            compute_dtype=self.compute_dtype,
        )
        finite, mismatch = score_micro_batches(self.model, self.ref_model, minis, scoring, self.dist)
        if not finite:  # before any optimizer step: nothing of this step is applied
            return self._skip_updates()
        ucfg = UpdateConfig(ppo_epochs=tc.ppo_epochs, max_grad_norm=tc.max_grad_norm, scoring=scoring)
        return update(
            self.model, self.optimizer, self.scheduler, minis, self.loss_cfg, ucfg, self.dist, mismatch
        )

    def _skip_updates(self) -> dict[str, float]:
        """No update this step; the LR schedule still advances, so it stays a function of the step."""
        with warnings.catch_warnings():  # torch warns about a scheduler step before any optimizer step
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(self.updates_per_step):
                self.scheduler.step()
        return {"updates": 0.0, "skipped_updates": float(self.updates_per_step)}

    # -- metrics -------------------------------------------------------------------------------------
    def _train_metrics(self, m: dict[str, float], had_advantages: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if m.get("skipped_updates", 0.0) > 0:
            self.bad_steps += 1
            if had_advantages:  # (a non-finite reward was already reported)
                warnings.warn(
                    f"step {self.step + 1}: non-finite advantage/loss/gradient; "
                    f"{int(m['skipped_updates'])} of {self.updates_per_step} update(s) skipped",
                    stacklevel=3,
                )
            out["train/skipped_updates"] = m["skipped_updates"]
        else:
            self.bad_steps = 0
        if not m.get("updates"):
            out["train/skipped"] = 1.0
            return out
        for k in ("loss", "pg_loss", "kl", "entropy", "clipfrac", "grad_norm"):
            if k in m:
                out[k] = m[k]
        out.setdefault("kl", 0.0)
        for k in ("kl_loss", "entropy_loss", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_max"):
            if k in m:
                out[f"train/{k}"] = m[k]
        for k in ("logprob_mismatch", "logprob_ratio_max"):
            if k in m:
                out[f"train/{k}"] = m[k]
        return out

    def _rollout_metrics(
        self,
        forests: list[Forest],
        rows: list[dict[str, Any]],
        r: np.ndarray,
        adv: np.ndarray | None,
        budget: dict[str, Any],
    ) -> dict[str, Any]:
        """Rewards, EM and budget summed over ranks (leaf-weighted means, additive budgets)."""
        ems = [
            exact_match(extract_answer(tree.response_text(leaf.id)), row["golden_answers"])
            for row, forest in zip(rows, forests, strict=True)
            for tree, leaf in forest.leaves()
        ]
        a = np.abs(adv) if adv is not None else np.zeros(0)
        s = self.dist.sum([r.sum(), (r**2).sum(), r.size, float(np.sum(ems)), len(ems), a.sum(), a.size])
        n = max(s[2], 1.0)
        mean = s[0] / n
        out: dict[str, Any] = {
            "train/reward_mean": mean if s[2] else 0.0,
            "train/reward_std": math.sqrt(max(s[1] / n - mean**2, 0.0)) if s[2] else 0.0,
            "train/em": s[3] / s[4] if s[4] else 0.0,
            "train/adv_abs_mean": s[5] / s[6] if s[6] else 0.0,
            "lr": float(self.scheduler.get_last_lr()[0]),
        }
        local = {k: float(budget[k]) for k in _BUDGET_KEYS if isinstance(budget.get(k), int | float)}
        present = self.dist.sum([1.0 if k in local else 0.0 for k in _BUDGET_KEYS])
        summed = self.dist.sum([local.get(k, 0.0) for k in _BUDGET_KEYS])
        for k, have, v in zip(_BUDGET_KEYS, present, summed, strict=True):
            if have:
                out[f"budget/{k}"] = v
                self.totals[k] = self.totals.get(k, 0) + v
                out[f"budget/cum_{k}"] = self.totals[k]
        out["tools/failures"] = out.get("budget/tool_failures", 0)
        return out

    def _mean_over_ranks(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The per-rank granularity and signal-diagnostic rates, averaged over ranks (each rank has the
        same number of prompts; the rest is already global)."""
        if self.world == 1:
            return metrics
        local = [
            k
            for k, v in metrics.items()
            if k.startswith(("granularity/", "signal/")) and isinstance(v, int | float)
        ]
        keys = self.dist.union(local)
        if keys:
            for k, v in zip(keys, self.dist.sum([float(metrics.get(k, 0.0)) for k in keys]), strict=True):
                metrics[k] = v / self.world
        return metrics

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Greedy evaluation on the held-out rows, sharded over ranks and combined (same on every rank)."""
        rows = self.parts.eval_rows[self.rank :: self.world]
        with autocast(self.dist.device, self.compute_dtype):
            local = evaluate(self.greedy, self.parts.env, rows) if rows else {}
        n = float(local.get("eval/n", 0.0))
        keys = ("eval/em", "eval/reward_mean", "eval/searches_mean")
        tot = self.dist.sum([local.get(k, 0.0) * n for k in keys] + [n])
        if not tot[-1]:
            return {}
        return {**{k: v / tot[-1] for k, v in zip(keys, tot, strict=False)}, "eval/n": tot[-1]}


def _pack(trees: Any, advs: Any, total_tokens: float, total_sequences: float, **kw: Any) -> Any:
    return pack(trees, advs, total_tokens=total_tokens, total_sequences=total_sequences, **kw)


def train(cfg: Config, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run `cfg` end to end; returns the final summary (also printed and saved as summary.json)."""
    dist = DistContext.from_environment()
    try:
        return _train(cfg, resume, progress, dist)
    finally:
        dist.close()


def _train(cfg: Config, resume: bool, progress: bool, dist: DistContext) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from treegrpo.progress import RunProgress

    hf_logging.disable_progress_bar()
    main = dist.is_main  # under torchrun only process 0 logs and saves
    run_dir = cfg.run_dir
    if run_dir.exists() and any(run_dir.glob("checkpoints/step-*")) and not resume:
        raise UserError(f"{run_dir}: a run with checkpoints exists; pass --resume or choose another name")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    ui = RunProgress(enabled=progress and main, quiet=not main)
    with ui, ExitStack() as stack:
        with dist.main_first():  # process 0 builds the warm-start cache, the others load it
            parts = build_run(cfg, log=ui.log, on_sft_step=ui.sft_callback(), device=dist.device)
        trainer = Trainer(cfg, parts, run_dir, dist)
        stack.callback(trainer.close)  # on any exit: no one-step-off rollout left running
        resumed = trainer.resume() if resume else False
        if trainer.served is not None:  # the servers start from the trainer's (resumed) weights
            trainer.sync_servers(trainer.served.begin)
        if resumed:
            ui.log(f"resumed from step {trainer.step}")
        logger = _Logger(run_dir, trainer.step if resumed else None, enabled=main)
        tc = cfg.trainer
        start_eval = None
        if tc.eval_every and parts.eval_rows and not resumed:
            ui.log(f"evaluating the starting model on {len(parts.eval_rows)} held-out questions")
            start_eval = trainer.evaluate()
            logger.log(0, {**start_eval, "budget/cum_generated_tokens": 0.0})
            ui.log(f"start: eval EM {start_eval['eval/em']:.3f}")
        t_start = time.perf_counter()
        ui.start_training(tc.steps, trainer.step)
        last: dict[str, Any] = {}
        while trainer.step < tc.steps:
            try:
                metrics = trainer.train_step()
            except NonFiniteWeights as e:
                logger.close()
                good = latest_checkpoint(run_dir / "checkpoints")
                where = f"the last good checkpoint is {good}" if good else "no checkpoint was written"
                raise NonFiniteWeights(f"step {trainer.step + 1}: {e}; {where}") from None
            forests = metrics.pop("_forests")
            step = trainer.step
            if tc.eval_every and parts.eval_rows and (step % tc.eval_every == 0 or step == tc.steps):
                metrics.update(trainer.evaluate())
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
        "world_size": dist.world,
        "train_seconds": time.perf_counter() - t_start,
        "eval_em_start": start_eval["eval/em"] if start_eval else None,
        "eval_em_end": last.get("eval/em"),
        "train_reward_last": last.get("train/reward_mean"),
        "generated_tokens": trainer.totals.get("generated_tokens"),
        "tool_calls": trainer.totals.get("tool_calls"),
        "trajectories": trainer.totals.get("trajectories"),
        **{f"warmstart_{k}": v for k, v in parts.warmstart.items() if k in ("cached", "seconds", "params")},
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
