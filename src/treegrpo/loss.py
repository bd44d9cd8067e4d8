"""GRPO / PPO policy loss over tensors (verl / TRL names), in a form that prefix-shared training can use.

Every aggregation mode is a weighted token sum: loss = Σ_tokens Σ_leaves w_l · ℓ(token, A_l), where w_l is
the leaf's aggregation weight (`token-mean`: 1/N with N the loss tokens of all leaves counted with
multiplicity; `seq-mean-token-mean`: 1/(S·n_l); `seq-mean-token-sum-norm` (Dr. GRPO): 1/(S·C) for a
constant length C). The clipped surrogate splits by advantage sign (SPEC §6), with A⁺ = max(A, 0),
A⁻ = min(A, 0) and c the dual-clip constant:

    Σ_l w_l·ℓ_pg(r, A_l) = −(Σ_l w_l A_l⁺)·min(r, clip r) − (Σ_l w_l A_l⁻)·min(c, max(r, clip r))

so a token shared by several leaves is forwarded once and carries five sums: Σw·A⁺, Σw·A⁻, Σw (KL,
entropy), Σw[A>0], Σw[A<0] (clip metrics). Value and gradient equal the per-leaf sum exactly, because each
term depends on the token only through r. `compute_policy_loss` is the special case of one leaf per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_KL_ALIASES = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3"}
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


@dataclass(frozen=True)
class LossConfig:
    """Loss hyper-parameters; defaults are the reference's (SPEC §6)."""

    epsilon: float = 0.2  # lower clip (verl clip_ratio_low)
    epsilon_high: float | None = None  # upper clip (verl clip_ratio_high); None → epsilon
    clip_ratio_c: float | None = 3.0  # dual clip on negative advantages; None disables
    beta: float = 0.001  # KL-to-reference coefficient (verl kl_loss_coef); 0 → no reference needed
    kl_estimator: str = "k3"  # k1 | k2 | k3 (aliases kl, mse, low_var_kl)
    entropy_coeff: float = 0.001  # entropy bonus (subtracted from the loss)
    loss_agg_mode: str = "token-mean"
    norm_length: int | None = None  # Dr. GRPO constant C; None → longest loss-token count in the batch

    def __post_init__(self) -> None:
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {self.loss_agg_mode!r}")
        if self.kl_estimator not in _KL_ALIASES:
            raise ValueError(f"kl_estimator must be one of {sorted(_KL_ALIASES)}, got {self.kl_estimator!r}")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError("epsilon and epsilon_high must be >= 0")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1, got {self.clip_ratio_c}")
        if self.norm_length is not None and self.norm_length <= 0:
            raise ValueError(f"norm_length must be > 0, got {self.norm_length}")

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL(π‖π_ref) estimate from sampled-token log-probs (Schulman's k1, k2, k3)."""
    kind = _KL_ALIASES.get(estimator)
    if kind is None:
        raise ValueError(f"kl_estimator must be one of {sorted(_KL_ALIASES)}, got {estimator!r}")
    diff = logprobs - ref_logprobs  # log π − log π_ref
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff.square()
    neg = torch.clamp(-diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # log(π_ref/π)
    return torch.clamp(torch.exp(neg) - neg - 1.0, -K3_CLAMP, K3_CLAMP)


def leaf_weights(
    loss_counts: Tensor | list[int],
    mode: str,
    norm_length: int | None = None,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
) -> Tensor:
    """Aggregation weight w_l of each sequence (leaf) given its number of loss tokens n_l.

    Sequences without loss tokens get weight 0 and are not counted in S. `total_tokens` /
    `total_sequences` override N and S so several micro-batches can share one mini-batch normaliser.
    """
    n = torch.as_tensor(loss_counts, dtype=torch.float64)
    has = n > 0
    if mode == "token-mean":
        denom = float(n.sum()) if total_tokens is None else float(total_tokens)
        w = torch.where(has, torch.full_like(n, 1.0 / max(denom, 1.0)), torch.zeros_like(n))
    elif mode in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):
        s = float(has.sum()) if total_sequences is None else float(total_sequences)
        s = max(s, 1.0)
        if mode == "seq-mean-token-mean":
            w = torch.where(has, 1.0 / (s * n.clamp(min=1.0)), torch.zeros_like(n))
        else:
            c = (
                float(norm_length)
                if norm_length is not None
                else max(float(n.max()) if n.numel() else 1.0, 1.0)
            )
            w = torch.where(has, torch.full_like(n, 1.0 / (s * c)), torch.zeros_like(n))
    else:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {mode!r}")
    return w


@dataclass
class TokenWeights:
    """Per-token sums over the leaves sharing the token (all tensors the same shape as the log-probs)."""

    adv_pos: Tensor  # Σ_l w_l·max(A_l, 0)
    adv_neg: Tensor  # Σ_l w_l·min(A_l, 0)  (≤ 0)
    weight: Tensor  # Σ_l w_l  (KL, entropy, metrics)
    weight_pos: Tensor  # Σ_l w_l·[A_l > 0]  (clip-fraction metrics)
    weight_neg: Tensor  # Σ_l w_l·[A_l < 0]

    @classmethod
    def from_sequences(cls, advantages: Tensor, mask: Tensor, seq_weights: Tensor) -> TokenWeights:
        """One leaf per row: advantages (B,) or (B,T), mask (B,T), seq_weights (B,)."""
        m = mask.to(torch.float64)
        adv = advantages.to(torch.float64)
        if adv.dim() == 1:
            adv = adv[:, None].expand_as(m)
        w = seq_weights.to(torch.float64)[:, None] * m
        return cls(
            adv_pos=w * adv.clamp(min=0.0),
            adv_neg=w * adv.clamp(max=0.0),
            weight=w,
            weight_pos=w * (adv > 0),
            weight_neg=w * (adv < 0),
        )

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> TokenWeights:
        return TokenWeights(*(getattr(self, f).to(device=device, dtype=dtype) for f in _TW_FIELDS))


_TW_FIELDS = ("adv_pos", "adv_neg", "weight", "weight_pos", "weight_neg")


def weighted_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    weights: TokenWeights,
    config: LossConfig,
    ref_logprobs: Tensor | None = None,
    entropies: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Loss = Σ_tokens [pg + β·kl·Σw − entropy_coeff·H·Σw] with the split clipped surrogate.

    Tokens with zero weight never contribute and get exactly zero gradient (their inputs are replaced
    before any nonlinearity, so even −inf/NaN log-probs there are harmless).
    """
    loss, metrics = _loss_terms(logprobs, old_logprobs, weights, config, ref_logprobs, entropies, True)
    return loss, metrics


def policy_loss_value(
    logprobs: Tensor,
    old_logprobs: Tensor,
    weights: TokenWeights,
    config: LossConfig,
    ref_logprobs: Tensor | None = None,
    entropies: Tensor | None = None,
) -> Tensor:
    """`weighted_policy_loss`'s loss alone, without metrics (no host syncs): for per-branch backwards."""
    return _loss_terms(logprobs, old_logprobs, weights, config, ref_logprobs, entropies, False)[0]


def _loss_terms(
    logprobs: Tensor,
    old_logprobs: Tensor,
    weights: TokenWeights,
    config: LossConfig,
    ref_logprobs: Tensor | None,
    entropies: Tensor | None,
    with_metrics: bool,
) -> tuple[Tensor, dict[str, float]]:
    dtype = logprobs.dtype
    w = weights.to(dtype, logprobs.device)
    active = w.weight != 0
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)

    lp = torch.where(active, logprobs, zero)
    old = torch.where(active, old_logprobs.to(dtype), zero)
    log_ratio = torch.clamp(lp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    lo, hi = 1.0 - config.epsilon, 1.0 + config.eps_high
    clipped = torch.clamp(ratio, lo, hi)
    pos_term = torch.minimum(ratio, clipped)  # A > 0: −A·min(r, clip r)
    neg_term = torch.maximum(ratio, clipped)  # A < 0: −A·max(r, clip r) ...
    if config.clip_ratio_c is not None:
        neg_term = torch.clamp(neg_term, max=config.clip_ratio_c)  # ... capped at −A·c (dual clip)
    pg = -(w.adv_pos * pos_term) - (w.adv_neg * neg_term)
    pg_loss = pg.sum()
    loss = pg_loss

    metrics: dict[str, float] = {}
    if not with_metrics:
        if config.beta != 0:
            if ref_logprobs is None:
                raise ValueError("beta != 0 needs ref_logprobs (set beta=0 to train without a reference)")
            ref = torch.where(active, ref_logprobs.to(dtype), lp.detach())
            loss = loss + config.beta * (w.weight * kl_penalty(lp, ref, config.kl_estimator)).sum()
        if config.entropy_coeff != 0:
            if entropies is None:
                raise ValueError("entropy_coeff != 0 needs entropies")
            ent = torch.where(active, entropies.to(dtype), zero)
            loss = loss - config.entropy_coeff * (w.weight * ent).sum()
        return loss, metrics
    wsum = w.weight.sum()
    denom = wsum if float(wsum) > 0 else torch.ones_like(wsum)
    if config.beta != 0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs (set beta=0 to train without a reference)")
        ref = torch.where(active, ref_logprobs.to(dtype), lp.detach())
        kl = kl_penalty(lp, ref, config.kl_estimator)
        kl_loss = (w.weight * kl).sum()
        loss = loss + config.beta * kl_loss
        metrics["kl_loss"] = float(kl_loss.detach())
        metrics["kl"] = float((w.weight * kl).sum().detach() / denom)
    if config.entropy_coeff != 0:
        if entropies is None:
            raise ValueError("entropy_coeff != 0 needs entropies")
        ent = torch.where(active, entropies.to(dtype), zero)
        ent_loss = (w.weight * ent).sum()
        loss = loss - config.entropy_coeff * ent_loss
        metrics["entropy_loss"] = float(ent_loss.detach())
    if entropies is not None:
        ent_d = torch.where(active, entropies.detach().to(dtype), zero)
        metrics["entropy"] = float((w.weight * ent_d).sum() / denom)

    with torch.no_grad():
        r = ratio.detach()
        clip_hi = (r > hi).to(dtype) * w.weight_pos  # clipping active on a positive advantage
        clip_lo = (r < lo).to(dtype) * w.weight_neg  # ... on a negative advantage
        dual = (r > config.clip_ratio_c).to(dtype) * w.weight_neg if config.clip_ratio_c else zero
        metrics.update(
            loss=float(loss.detach()),
            pg_loss=float(pg_loss.detach()),
            clipfrac=float((clip_hi + clip_lo).sum() / denom),
            clipfrac_lower=float(dual.sum() / denom),  # verl pg_clipfrac_lower: dual clip active
            approx_kl=float((w.weight * -log_ratio.detach()).sum() / denom),  # verl ppo_kl
            ratio_mean=float((w.weight * r).sum() / denom),
            ratio_max=float(r[active].max()) if bool(active.any()) else 1.0,
            weight_sum=float(wsum),
        )
    return loss, metrics


def compute_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    config: LossConfig | None = None,
    ref_logprobs: Tensor | None = None,
    entropies: Tensor | None = None,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Per-sequence PPO/GRPO loss: tensors (B, T), advantages (B,) or (B, T), mask 1 = loss token."""
    config = config or LossConfig()
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"shape mismatch: logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (batch, tokens), got shape {tuple(logprobs.shape)}")
    counts = (mask != 0).sum(-1)
    seq_w = leaf_weights(counts, config.loss_agg_mode, config.norm_length, total_tokens, total_sequences)
    tw = TokenWeights.from_sequences(advantages, mask != 0, seq_w)
    return weighted_policy_loss(logprobs, old_logprobs, tw, config, ref_logprobs, entropies)
