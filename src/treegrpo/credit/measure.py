"""One batch of forests → credit-quality-by-depth tables for several estimators at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from treegrpo.credit.assign import StepKey, generated_steps, step_credit
from treegrpo.credit.metrics import by_depth
from treegrpo.credit.truth import StepTruth
from treegrpo.tree import Forest


@dataclass(frozen=True)
class StepRecord:
    """One generated step: where it is, its depth, its credit and its Monte-Carlo truth."""

    key: StepKey
    depth: int
    credit: float
    a_star: float
    se: float


def step_records(
    forests: Sequence[Forest],
    truth: dict[StepKey, StepTruth],
    estimator: str,
    loss_agg_mode: str = "token-mean",
) -> list[StepRecord]:
    credit = step_credit(forests, estimator, loss_agg_mode)
    return [
        StepRecord(key, depth, credit[key], truth[key].a_star, truth[key].se)
        for key, depth in generated_steps(forests)
    ]


def credit_by_depth(
    forests: Sequence[Forest],
    truth: dict[StepKey, StepTruth],
    estimators: Sequence[str],
    loss_agg_mode: str = "token-mean",
    z_sign: float = 1.0,
    z_zero: float = 2.0,
) -> dict[str, dict[str, dict[str, Any]]]:
    """{estimator: {"0": metrics, "1": ...}} for one loss batch (`forests`) and its truth."""
    out = {}
    for est in estimators:
        recs = step_records(forests, truth, est, loss_agg_mode)
        out[est] = by_depth(
            [r.depth for r in recs],
            [r.credit for r in recs],
            [r.a_star for r in recs],
            [r.se for r in recs],
            z_sign,
            z_zero,
        )
    return out
