"""Credit quality by depth: is each step's supervision right? (per-step credit vs Monte-Carlo A*).

Pure algorithm code: `assign` (what the loss gives each step), `truth` (Monte-Carlo node values through
any Policy/Environment), `metrics` (correlations, sign agreement, wasted share, snr by depth),
`measure` (one batch → tables), `toy` (a task with closed-form A*). I/O lives in `credit.report`.
"""

from treegrpo.credit.assign import NODE_VALUE, StepKey, credit_estimators, generated_steps, step_credit
from treegrpo.credit.measure import StepRecord, credit_by_depth, step_records
from treegrpo.credit.metrics import METRICS, aggregate, by_depth, depth_metrics, pearson, spearman
from treegrpo.credit.truth import StepTruth, Value, ValueCache, mc_values, step_truth

__all__ = [
    "METRICS",
    "NODE_VALUE",
    "StepKey",
    "StepRecord",
    "StepTruth",
    "Value",
    "ValueCache",
    "aggregate",
    "by_depth",
    "credit_by_depth",
    "credit_estimators",
    "depth_metrics",
    "generated_steps",
    "mc_values",
    "pearson",
    "spearman",
    "step_credit",
    "step_records",
    "step_truth",
]
