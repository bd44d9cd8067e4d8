"""Per-step credit: what the loss actually gives one agent step's tokens, for each estimator.

A step (a generated node) shared by several leaves is trained once per leaf below it, each time with
that leaf's advantage and aggregation weight (SPEC §5, §6; `loss.leaf_weights`). Its per-token credit
is therefore Σ_{leaves l below it} w_l·A_l: the tree viewer's ΣA, normalised the way the loss
normalises. For a chain every step of a trajectory gets the same w·A. `node_value` is TreeRL-style
process credit, V(node) − V(parent) from the tree's own leaves, which a step gets directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from treegrpo.advantage import ESTIMATORS, compute_advantages, node_value_advantages
from treegrpo.tree import Forest, leaf_arrays

NODE_VALUE = "node_value"


@dataclass(frozen=True)
class StepKey:
    """One generated node of a batch: forest index, tree index within the forest, node id."""

    forest: int
    tree: int
    node: int


def generated_steps(forests: Sequence[Forest]) -> list[tuple[StepKey, int]]:
    """Every generated node with its step depth (0 = the first step after the prompt)."""
    out = []
    for fi, forest in enumerate(forests):
        for ti, tree in enumerate(forest.trees):
            out.extend((StepKey(fi, ti, n.id), n.depth - 1) for n in tree.nodes[1:])
    return out


def credit_estimators() -> list[str]:
    """Every registered leaf estimator, plus the node-value process credit."""
    return sorted(ESTIMATORS) + [NODE_VALUE]


def step_credit(
    forests: Sequence[Forest],
    estimator: str,
    loss_agg_mode: str = "token-mean",
    norm_length: int | None = None,
    eps: float = 1e-6,
) -> dict[StepKey, float]:
    """Per-token credit of every generated step of a batch (all `forests` form one loss batch)."""
    if estimator == NODE_VALUE:
        out: dict[StepKey, float] = {}
        for fi, forest in enumerate(forests):
            for ti, tree in enumerate(forest.trees):
                local = node_value_advantages(tree)["local"]
                out.update({StepKey(fi, ti, n.id): float(local[n.id]) for n in tree.nodes[1:]})
        return out
    from treegrpo.loss import leaf_weights  # torch: imported only when credit is computed

    rewards, groups, tree_ids = leaf_arrays(forests)
    adv = compute_advantages(rewards, groups, tree_ids, estimator, eps)
    counts: list[int] = []
    for forest in forests:
        for tree in forest.trees:
            for leaf in tree.leaves():
                counts.append(sum(len(tree.nodes[a].token_ids) for a in tree.ancestors(leaf.id)[1:]))
    w = leaf_weights(counts, loss_agg_mode, norm_length).numpy()
    out = {}
    i = 0
    for fi, forest in enumerate(forests):
        for ti, tree in enumerate(forest.trees):
            total = np.zeros(len(tree.nodes))
            for leaf in tree.leaves():
                total[leaf.id] = w[i] * adv[i]
                i += 1
            for node in reversed(tree.nodes[1:]):  # children come after their parent
                if node.parent is not None and node.parent > 0:
                    total[node.parent] += total[node.id]
            out.update({StepKey(fi, ti, n.id): float(total[n.id]) for n in tree.nodes[1:]})
    return out
