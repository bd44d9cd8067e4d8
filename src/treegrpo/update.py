"""The policy update of one RL step, as functions of explicit inputs.

    plan_mini_batches   which of this rank's forests belong to each global mini-batch
    pack_mini_batches   whole trees → packed micro-batches, normalized by global token counts
    score_micro_batches old (trainer) and reference log-probs, no grad, eval mode; sampler mismatch / TIS
    update              ppo_epochs × mini-batches optimizer steps, one gradient all-reduce each

Every rank runs the same number of mini-batches, micro-batches (padded with `None` where a rank has no
trees) and collectives, whatever its trees look like. The global mini-batch is the set of prompts a single
process would put in it, so N processes take the same optimizer steps as one process on the same batch.

Non-finite values: if an old or reference log-prob is non-finite on any rank, no update is taken this
step. Each optimizer step is atomic and agreed by all ranks: if a loss or the summed gradient is
non-finite, that step is dropped everywhere (gradients cleared, optimizer state untouched, the scheduler
still advances so the schedule stays a function of the step); the others apply. After every applied step
the weights and optimizer state are checked; non-finite ones stop the run (`NonFiniteWeights`, exit 2)
before anything is saved.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from treegrpo.distributed import DistContext
from treegrpo.errors import UserError
from treegrpo.loss import LossConfig, TokenWeights, weighted_policy_loss
from treegrpo.packing import PackedBatch, forward_logprobs, loss_token_totals, packed_loss
from treegrpo.precision import autocast
from treegrpo.reference import reference_logprobs
from treegrpo.tree import Forest, Tree


class NonFiniteWeights(UserError):
    """An optimizer step made the weights or optimizer state non-finite; the run stops unsaved."""


# -- planning -----------------------------------------------------------------------------------------
def updates_per_step(prompts_per_step: int, mini_batch_prompts: int, ppo_epochs: int) -> int:
    """Optimizer steps per RL step, the same on every rank (the LR schedule counts these)."""
    mb = mini_batch_prompts or prompts_per_step
    return math.ceil(prompts_per_step / mb) * ppo_epochs


def plan_mini_batches(
    num_local: int, rank: int, world: int, prompts_per_step: int, mini_batch_prompts: int
) -> list[list[int]]:
    """Local forest indices of each global mini-batch.

    This rank's j-th forest is global prompt `rank + j * world` (rows are dealt round-robin), and global
    mini-batch k holds prompts [k·M, (k+1)·M): the same prompts a single process would group.
    """
    mb = mini_batch_prompts or prompts_per_step
    groups: list[list[int]] = [[] for _ in range(math.ceil(prompts_per_step / mb))]
    for j in range(num_local):
        groups[min((rank + j * world) // mb, len(groups) - 1)].append(j)
    return groups


def split_trees(
    trees: list[Tree], advs: list[np.ndarray], parts: int
) -> list[tuple[list[Tree], list[float]]]:
    """Split whole trees into at most `parts` micro-batches (never splitting a tree).

    Trees are sorted by token count and cut into contiguous runs of equal total size, so each padded
    micro-batch holds trees of similar length (less padding, and the O(T^2) masks stay small).
    """
    if not trees:
        return []
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


def attach_advantages(forests: list[Forest], adv: np.ndarray) -> list[np.ndarray]:
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


@dataclass
class MicroBatch:
    batch: PackedBatch
    ref_logprobs: Tensor | None = None


@dataclass
class MiniBatch:
    """`accumulation` micro-batches; `None` marks one this rank has no trees for."""

    micro: list[MicroBatch | None]


PackFn = Callable[[list[Tree], list[float], float, float], PackedBatch]


def pack_mini_batches(
    forests: Sequence[Forest],
    per_tree_adv: Sequence[np.ndarray],
    groups: list[list[int]],
    accumulation: int,
    pack_fn: PackFn,
    dist: DistContext,
) -> list[MiniBatch]:
    """Pack each mini-batch's trees into exactly `accumulation` micro-batches on every rank.

    `pack_fn(trees, advantages, total_tokens, total_sequences)`; the totals are the mini-batch's over all
    ranks, so the micro-batch losses of all ranks add up to the mini-batch's loss (one all-reduce here).
    """
    tree_adv: list[tuple[Tree, np.ndarray]] = []
    k = 0
    offsets = []
    for f in forests:
        offsets.append(len(tree_adv))
        for t in f.trees:
            tree_adv.append((t, per_tree_adv[k]))
            k += 1
    offsets.append(len(tree_adv))
    chosen = [[tree_adv[i] for j in g for i in range(offsets[j], offsets[j + 1])] for g in groups]
    local = [v for c in chosen for v in loss_token_totals([t for t, _ in c])]
    totals = dist.sum(local)
    minis = []
    for i, c in enumerate(chosen):
        n_tok, n_seq = totals[2 * i], totals[2 * i + 1]
        bins = split_trees([t for t, _ in c], [a for _, a in c], accumulation)
        micro: list[MicroBatch | None] = [MicroBatch(pack_fn(t, a, n_tok, n_seq)) for t, a in bins]
        minis.append(MiniBatch(micro + [None] * (accumulation - len(micro))))
    return minis


# -- sampler / trainer mismatch ---------------------------------------------------------------------
@dataclass
class Mismatch:
    """Σ w·|trainer − sampler| log-prob, Σ w over loss tokens, and the largest trainer/sampler ratio."""

    abs_sum: float = 0.0
    weight: float = 0.0
    ratio_max: float = 0.0

    def add(self, other: Mismatch) -> None:
        self.abs_sum += other.abs_sum
        self.weight += other.weight
        self.ratio_max = max(self.ratio_max, other.ratio_max)


def sampler_correction(
    trainer_lp: Tensor, batch: PackedBatch, tis_cap: float
) -> tuple[TokenWeights, Mismatch]:
    """Mismatch of `trainer_lp` against the sampler's log-probs (`batch.old_logprobs`) and the weights
    with truncated importance sampling: the policy-gradient sums scaled per token by
    min(exp(trainer − sampler), tis_cap) when `tis_cap` > 0 (KL, entropy and metric weights unscaled)."""
    dev = trainer_lp.device
    w = batch.weights.to(torch.float64, dev)
    active = w.weight != 0
    diff = trainer_lp.detach().to(torch.float64) - batch.old_logprobs.to(dev, torch.float64)
    diff = torch.where(active, diff, torch.zeros_like(diff))
    finite = torch.isfinite(diff)
    stats = Mismatch()
    if bool(active.any()):
        ok = active & finite
        stats = Mismatch(
            abs_sum=float((w.weight * diff.abs()).where(ok, 0.0).sum()),
            weight=float(w.weight.where(ok, 0.0).sum()),
            ratio_max=float(diff[ok].clamp(max=20.0).exp().max()) if bool(ok.any()) else 0.0,
        )
    if tis_cap <= 0:
        return batch.weights, stats
    factor = torch.where(
        active & finite, diff.clamp(max=20.0).exp().clamp(max=tis_cap), torch.ones_like(diff)
    )
    cpu = batch.weights.adv_pos.device
    scaled = replace(
        batch.weights, adv_pos=(w.adv_pos * factor).to(cpu), adv_neg=(w.adv_neg * factor).to(cpu)
    )
    return scaled, stats


# -- scoring ------------------------------------------------------------------------------------------
@dataclass
class Scoring:
    temperature: float
    beta: float
    recompute_old: bool  # False: on-policy, the loss forward's own detached log-probs are the old ones
    tis_cap: float = 0.0
    compute_dtype: torch.dtype | None = None


def score_micro_batches(
    model: Any, ref: Any, minis: list[MiniBatch], cfg: Scoring, dist: DistContext
) -> tuple[bool, Mismatch]:
    """Old and reference log-probs of every micro-batch, in eval mode (no dropout), in place.

    Returns (finite on every rank, sampler mismatch of the recomputed old log-probs).
    """
    was_training = model.training
    model.eval()
    finite = True
    mismatch = Mismatch()
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), autocast(device, cfg.compute_dtype):
            for mini in minis:
                for micro in mini.micro:
                    if micro is None:
                        continue
                    b = micro.batch
                    if cfg.beta > 0:
                        micro.ref_logprobs = reference_logprobs(ref, model, b, cfg.temperature)
                        finite &= bool(torch.isfinite(micro.ref_logprobs[b.loss_mask.to(device)]).all())
                    if cfg.recompute_old:
                        old, _ = forward_logprobs(model, b, cfg.temperature, compute_entropy=False)
                        finite &= bool(torch.isfinite(old[b.loss_mask.to(device)]).all())
                        weights, stats = sampler_correction(old, b, cfg.tis_cap)
                        mismatch.add(stats)
                        micro.batch = replace(b.with_old_logprobs(old), weights=weights)
    finally:
        model.train(was_training)
    return dist.all_true(finite), mismatch


# -- the update ---------------------------------------------------------------------------------------
_ADDITIVE = ("loss", "pg_loss", "kl_loss", "entropy_loss", "forward_tokens")
_WEIGHTED = ("kl", "entropy", "clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean")


@dataclass
class MetricSums:
    """Loss metrics summed so that their global value is exact: additive terms add up over micro-batches
    and ranks; means are Σ(metric·Σw) / Σw (token-weighted); `ratio_max` is a max."""

    additive: dict[str, float] = field(default_factory=dict)
    num: dict[str, float] = field(default_factory=dict)
    den: float = 0.0
    ratio_max: float = 0.0

    def add(self, m: dict[str, float]) -> None:
        for k in _ADDITIVE:
            if k in m:
                self.additive[k] = self.additive.get(k, 0.0) + float(m[k])
        ws = float(m.get("weight_sum", 0.0))
        for k in _WEIGHTED:
            if k in m:
                self.num[k] = self.num.get(k, 0.0) + float(m[k]) * ws
        self.den += ws
        if ws > 0:
            self.ratio_max = max(self.ratio_max, float(m.get("ratio_max", 0.0)))

    def merge(self, other: MetricSums) -> None:
        for k, v in other.additive.items():
            self.additive[k] = self.additive.get(k, 0.0) + v
        for k, v in other.num.items():
            self.num[k] = self.num.get(k, 0.0) + v
        self.den += other.den
        self.ratio_max = max(self.ratio_max, other.ratio_max)


@dataclass
class UpdateConfig:
    ppo_epochs: int = 1
    max_grad_norm: float = 1.0  # 0 = no clipping
    scoring: Scoring = field(default_factory=lambda: Scoring(temperature=1.0, beta=0.0, recompute_old=True))


def micro_loss(
    model: Any, micro: MicroBatch, loss_cfg: LossConfig, scoring: Scoring
) -> tuple[Tensor, dict[str, float], Mismatch | None]:
    """Loss and metrics of one micro-batch (what `packing.packed_loss` computes, plus the log-probs'
    sampler mismatch and TIS weights when the old log-probs are this forward's own)."""
    b = micro.batch
    ref = None if micro.ref_logprobs is None else micro.ref_logprobs
    if b.packing == "path":  # memory-bounded: backward runs branch by branch inside packed_loss
        loss, metrics = packed_loss(
            model, b, loss_cfg, ref, temperature=scoring.temperature, on_policy=not scoring.recompute_old
        )
        return loss, metrics, None
    lp, ent = forward_logprobs(model, b, scoring.temperature, compute_entropy=True)
    weights, stats = b.weights, None
    if scoring.recompute_old:
        old = b.old_logprobs.to(lp.device)
    else:
        old = lp.detach()
        weights, stats = sampler_correction(old, b, scoring.tis_cap)
    ref = None if ref is None else ref.to(lp.device)
    loss, metrics = weighted_policy_loss(lp, old, weights, loss_cfg, ref, ent)
    metrics["forward_tokens"] = float(b.num_forward_tokens)
    return loss, metrics, stats


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def weights_finite(params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> bool:
    """Parameters and every floating-point optimizer state tensor are finite (this rank)."""
    state = [
        v
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, Tensor) and v.is_floating_point()
    ]
    return _all_finite([p.detach() for p in params]) and _all_finite(state)


def update(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    minis: list[MiniBatch],
    loss_cfg: LossConfig,
    cfg: UpdateConfig,
    dist: DistContext,
    mismatch: Mismatch | None = None,
    loss_fn: Callable[..., tuple[Tensor, dict[str, float], Mismatch | None]] | None = None,
) -> dict[str, float]:
    """`ppo_epochs` passes over `minis`, one optimizer step per mini-batch; globally reduced metrics.

    Collectives per optimizer step, on every rank: one gradient all-reduce, one agreement on
    finiteness, one on the weights after the step; then one metric reduction at the end.
    """
    loss_fn = loss_fn or micro_loss
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    sums = MetricSums()
    mismatch = mismatch or Mismatch()
    grad_norms: list[float] = []
    applied = skipped = 0
    model.train()
    for _ in range(cfg.ppo_epochs):
        for mini in minis:
            optimizer.zero_grad(set_to_none=True)
            step = MetricSums()
            finite = True
            for micro in mini.micro:
                if micro is None or not finite:
                    continue
                with autocast(device, cfg.scoring.compute_dtype):
                    loss, m, stats = loss_fn(model, micro, loss_cfg, cfg.scoring)
                if not bool(torch.isfinite(loss.detach())):
                    finite = False
                    continue
                loss.backward()
                step.add(m)
                if stats is not None:
                    mismatch.add(stats)
            dist.all_reduce_gradients(params)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
            if dist.all_true(finite and math.isfinite(grad_norm)):
                optimizer.step()
                applied += 1
                sums.merge(step)
                grad_norms.append(grad_norm)
                if not dist.all_true(weights_finite(params, optimizer)):
                    raise NonFiniteWeights(
                        "the weights or optimizer state are not finite after an optimizer step "
                        f"(grad norm {grad_norm:.3g}, lr {scheduler.get_last_lr()[0]:.3g}); the run stops "
                        "without saving this state (lower trainer.lr or check the loss inputs)"
                    )
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # a skipped first step is not torch's "step order" mistake
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
    return _reduce(sums, mismatch, grad_norms, applied, skipped, loss_cfg, dist)


def _reduce(
    sums: MetricSums,
    mismatch: Mismatch,
    grad_norms: list[float],
    applied: int,
    skipped: int,
    loss_cfg: LossConfig,
    dist: DistContext,
) -> dict[str, float]:
    """One sum and one max over ranks, with a fixed key order (a rank without trees sends zeros)."""
    vec = [sums.additive.get(k, 0.0) for k in _ADDITIVE] + [sums.num.get(k, 0.0) for k in _WEIGHTED]
    vec += [sums.den, mismatch.abs_sum, mismatch.weight]
    tot = dict(zip([*_ADDITIVE, *_WEIGHTED, "den", "mm_abs", "mm_w"], dist.sum(vec), strict=True))
    ratio_max, mm_ratio_max = dist.max([sums.ratio_max, mismatch.ratio_max])
    out: dict[str, float] = {"updates": float(applied), "skipped_updates": float(skipped)}
    dropped = set() if loss_cfg.beta != 0 else {"kl", "kl_loss"}
    if loss_cfg.entropy_coeff == 0:
        dropped.add("entropy_loss")
    if applied:
        for k in _ADDITIVE:  # per-update values, averaged over the applied updates
            out[k] = tot[k] / applied
        for k in _WEIGHTED:
            out[k] = tot[k] / tot["den"] if tot["den"] > 0 else 0.0
        out["ratio_max"] = ratio_max
        out["grad_norm"] = float(np.mean(grad_norms))
        for k in dropped:
            out.pop(k, None)
    if tot["mm_w"] > 0:
        out["logprob_mismatch"] = tot["mm_abs"] / tot["mm_w"]
        out["logprob_ratio_max"] = mm_ratio_max
    return out
