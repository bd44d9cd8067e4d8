"""Monte-Carlo ground truth: the value of a node under the current policy, and A*(s) = V(s) − V(parent).

V(node) = expected final reward of the policy continued from the node's state, estimated by `k` fresh
rollouts from it (separate from the tree's own leaves). A leaf's value is its reward, exactly. All
continuations of a batch run together (`rollout.continue_from`), so they are batched like a tree wave.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from treegrpo.credit.assign import StepKey
from treegrpo.protocols import Environment, Policy
from treegrpo.rollout import RolloutConfig, continue_from
from treegrpo.tree import Forest


@dataclass(frozen=True)
class Value:
    """A Monte-Carlo value estimate: mean, standard error of the mean, number of rollouts."""

    mean: float
    se: float
    n: int


@dataclass(frozen=True)
class StepTruth:
    """A*(s) = V(s) − V(parent) and its standard error (the two estimates are independent)."""

    a_star: float
    se: float


def _value(rewards: Sequence[float]) -> Value:
    r = np.asarray(rewards, dtype=np.float64)
    se = float(r.std(ddof=1) / math.sqrt(r.size)) if r.size >= 2 else 0.0
    return Value(float(r.mean()), se, int(r.size))


class ValueCache:
    """Continuation rewards by context ids, shared across batches of the same policy and env.

    Assumes what the Search-R1 env guarantees: a node's state is a function of its context (the
    response text is the decoding of the context), so equal contexts have equal values.
    """

    def __init__(self) -> None:
        self.rewards: dict[tuple[int, ...], list[float]] = {}
        self.generated_tokens = 0


def mc_values(
    forests: Sequence[Forest],
    policy: Policy,
    env: Environment,
    k: int,
    config: RolloutConfig | None = None,
    cache: ValueCache | None = None,
) -> dict[StepKey, Value]:
    """V of every node of every tree (roots included): `k` continuations per non-leaf node."""
    if k < 2:
        raise ValueError(f"k must be >= 2 rollouts per node (a standard error needs two), got {k}")
    cache = cache if cache is not None else ValueCache()
    cfg = config or RolloutConfig(strategy="chain")
    out: dict[StepKey, Value] = {}
    wanted: dict[tuple[int, ...], tuple[list[StepKey], object, int]] = {}
    for fi, forest in enumerate(forests):
        for ti, tree in enumerate(forest.trees):
            for node in tree.nodes:
                key = StepKey(fi, ti, node.id)
                if node.is_leaf:
                    out[key] = Value(float(node.reward or 0.0), 0.0, 0)
                    continue
                if node.state is None:
                    raise ValueError(
                        f"tree {tree.group_id}/{tree.tree_index} node {node.id} has no environment state "
                        "(trees read back from JSON carry none): sample fresh forests to measure credit"
                    )
                ctx = tuple(tree.context_ids(node.id))
                have = len(cache.rewards.get(ctx, []))
                if ctx in wanted:
                    wanted[ctx][0].append(key)
                else:
                    wanted[ctx] = ([key], node.state, max(0, k - have))
    starts = [(list(ctx), st) for ctx, (_, st, need) in wanted.items() for _ in range(need)]
    if starts:
        rewards, tokens = continue_from(starts, policy, env, cfg)
        cache.generated_tokens += tokens
        pos = 0
        for ctx, (_, _, need) in wanted.items():
            cache.rewards.setdefault(ctx, []).extend(rewards[pos : pos + need])
            pos += need
    for ctx, (keys, _, _) in wanted.items():
        v = _value(cache.rewards[ctx][:k])
        out.update(dict.fromkeys(keys, v))
    return out


def step_truth(forests: Sequence[Forest], values: dict[StepKey, Value]) -> dict[StepKey, StepTruth]:
    """A* and its standard error for every generated node, from the node values."""
    out: dict[StepKey, StepTruth] = {}
    for fi, forest in enumerate(forests):
        for ti, tree in enumerate(forest.trees):
            for node in tree.nodes[1:]:
                v, p = values[StepKey(fi, ti, node.id)], values[StepKey(fi, ti, int(node.parent or 0))]
                out[StepKey(fi, ti, node.id)] = StepTruth(v.mean - p.mean, math.hypot(v.se, p.se))
    return out
