"""Per-leaf advantage estimators (SPEC §5) as small pure numpy functions in a registry.

Every estimator sees one flat array of leaf rewards plus dense integer codes for the group (prompt)
and the tree of each leaf, so a whole batch is scored in a handful of vectorized passes
(`np.bincount`), never a Python loop over groups: 100k leaves take milliseconds.

Conventions shared by all z-scores, matching the reference: unbiased std (n-1), `eps` added to the
std, a group of one leaf uses mean 0 and std 1 (so its score is R/(1+eps)), and a group whose rewards
are all equal gets exactly 0 (not a rounding-noise value divided by eps).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from treegrpo.tree import Tree

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
# estimator(rewards, group_codes, tree_codes, eps) -> advantages; codes are dense ints 0..K-1 and
# tree codes are unique across the whole batch (a tree of group 0 never shares a code with group 1).
Estimator = Callable[[FloatArray, IntArray, IntArray, float], FloatArray]

ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Register an estimator under `name` so configs can select it by string."""

    def deco(fn: Estimator) -> Estimator:
        if name in ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ESTIMATORS[name] = fn
        return fn

    return deco


def group_zscore(values: FloatArray, codes: IntArray, eps: float = 1e-6) -> FloatArray:
    """z-score of each value within its group (dense int codes), with the SPEC §5 conventions."""
    k = int(codes.max()) + 1 if codes.size else 0
    counts = np.bincount(codes, minlength=k).astype(np.float64)
    mean = np.bincount(codes, weights=values, minlength=k) / np.maximum(counts, 1.0)
    dev = values - mean[codes]
    ss = np.bincount(codes, weights=dev * dev, minlength=k)
    std = np.sqrt(ss / np.maximum(counts - 1.0, 1.0))
    constant = _constant(values, codes, k)
    single = counts == 1.0
    mean = np.where(single, 0.0, mean)
    std = np.where(single, 1.0, std)
    z = (values - mean[codes]) / (std[codes] + eps)
    return np.where(constant[codes] & ~single[codes], 0.0, z)


def _constant(values: FloatArray, codes: IntArray, k: int) -> NDArray[np.bool_]:
    """Groups whose values are all equal: their advantage is exactly 0, whatever the mean's rounding."""
    vmin = np.full(k, np.inf)
    vmax = np.full(k, -np.inf)
    np.minimum.at(vmin, codes, values)
    np.maximum.at(vmax, codes, values)
    return vmin == vmax


@register_estimator("grpo")
def grpo(rewards: FloatArray, groups: IntArray, trees: IntArray, eps: float) -> FloatArray:
    """Chain GRPO: z-score over the prompt's group, tree structure ignored."""
    return group_zscore(rewards, groups, eps)


@register_estimator("rloo")
def rloo(rewards: FloatArray, groups: IntArray, trees: IntArray, eps: float) -> FloatArray:
    """Reward minus the mean of the *other* leaves of the group (a lone leaf keeps its reward)."""
    k = int(groups.max()) + 1
    counts = np.bincount(groups, minlength=k).astype(np.float64)
    sums = np.bincount(groups, weights=rewards, minlength=k)
    n = counts[groups]
    others = np.where(n > 1, (sums[groups] - rewards) / np.maximum(n - 1.0, 1.0), 0.0)
    flat = _constant(rewards, groups, k)[groups] & (n > 1)
    return np.where(flat, 0.0, rewards - others)


@register_estimator("tree_inter")
def tree_inter(rewards: FloatArray, groups: IntArray, trees: IntArray, eps: float) -> FloatArray:
    """z-score over all leaves of the prompt (across its M trees)."""
    return group_zscore(rewards, groups, eps)


@register_estimator("tree_intra")
def tree_intra(rewards: FloatArray, groups: IntArray, trees: IntArray, eps: float) -> FloatArray:
    """z-score over the leaves of the leaf's own tree."""
    return group_zscore(rewards, trees, eps)


@register_estimator("tree")
def tree(rewards: FloatArray, groups: IntArray, trees: IntArray, eps: float) -> FloatArray:
    """Tree-GRPO default: intra + inter, a plain sum without re-normalization."""
    return group_zscore(rewards, trees, eps) + group_zscore(rewards, groups, eps)


@register_estimator("tree_2norm")
def tree_2norm(rewards: FloatArray, groups: IntArray, trees: IntArray, eps: float) -> FloatArray:
    """z over the prompt, then z of those scores again inside each tree."""
    return group_zscore(group_zscore(rewards, groups, eps), trees, eps)


def _codes(ids: ArrayLike, name: str, n: int) -> IntArray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one entry per leaf ({n}), got shape {arr.shape}")
    _, inv = np.unique(arr, return_inverse=True)
    return inv.reshape(-1).astype(np.int64)


def compute_advantages(
    rewards: ArrayLike,
    group_ids: ArrayLike,
    tree_ids: ArrayLike,
    estimator: str = "tree",
    eps: float = 1e-6,
) -> FloatArray:
    """Advantage per leaf. `group_ids` name the prompt of each leaf; `tree_ids` are unique within a group.

    Raises ValueError on non-finite rewards, mismatched lengths or an unknown estimator, so the
    trainer can skip a bad batch instead of training on NaN.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {sorted(ESTIMATORS)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"rewards must be 1-D, got shape {r.shape}")
    if r.size == 0:
        return np.zeros(0, dtype=np.float64)
    bad = ~np.isfinite(r)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"rewards must be finite: leaf {i} has reward {r[i]} ({int(bad.sum())} bad in total)"
        )
    g = _codes(group_ids, "group_ids", r.size)
    t = _codes(tree_ids, "tree_ids", r.size)
    # Tree codes unique across groups: (group, tree) pairs, densified.
    t = np.unique(g * (int(t.max()) + 1) + t, return_inverse=True)[1].reshape(-1).astype(np.int64)
    out = ESTIMATORS[estimator](r, g, t, float(eps))
    return np.asarray(out, dtype=np.float64)


def node_value_advantages(tree: Tree, sqrt_leaves: bool = False) -> dict[str, FloatArray]:
    """TreeRL-style process credit for one finished tree, indexed by node id.

    V(node) = mean leaf reward in its subtree; `local` = V(node) - V(parent), `global` =
    V(node) - V(root) (both 0 at the root). With `sqrt_leaves`, both are divided by
    sqrt(#leaves below the node) as TreeRL does to damp nodes that many leaves share.
    Returns {"value", "local", "global", "leaves"} arrays of length len(tree.nodes).
    """
    n = len(tree.nodes)
    total = np.zeros(n)
    count = np.zeros(n)
    for idx, node in enumerate(tree.nodes):
        if node.id != idx or (node.parent is not None and not 0 <= node.parent < node.id):
            raise ValueError(f"tree {tree.group_id}/{tree.tree_index}: node {node.id} is out of order")
        if node.is_leaf:
            if node.reward is None or not np.isfinite(node.reward):
                raise ValueError(
                    f"tree {tree.group_id}/{tree.tree_index}: leaf {node.id} has reward {node.reward!r}"
                )
            total[node.id] = node.reward
            count[node.id] = 1.0
    for node in reversed(tree.nodes):  # children always come after their parent
        if node.parent is not None:
            total[node.parent] += total[node.id]
            count[node.parent] += count[node.id]
    if (count == 0).any():
        i = int(np.flatnonzero(count == 0)[0])
        raise ValueError(f"tree {tree.group_id}/{tree.tree_index}: node {i} has no finished leaf below it")
    value = total / count
    parents = np.array([nd.parent if nd.parent is not None else nd.id for nd in tree.nodes])
    local = value - value[parents]
    glob = value - value[0]
    if sqrt_leaves:
        local = local / np.sqrt(count)
        glob = glob / np.sqrt(count)
    return {"value": value, "local": local, "global": glob, "leaves": count}


def estimator_names() -> list[str]:
    return sorted(ESTIMATORS)


def describe(estimator: str) -> str:
    """The estimator's docstring (for CLI help)."""
    return (ESTIMATORS[estimator].__doc__ or "").strip()


__all__ = [
    "ESTIMATORS",
    "compute_advantages",
    "estimator_names",
    "group_zscore",
    "node_value_advantages",
    "register_estimator",
]
