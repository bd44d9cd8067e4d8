"""Expansion strategies: which nodes of a finished tree the next iteration branches from.

Each strategy is a pure function `fn(tree, n, rng, **params) -> list[int]` registered by name. It
returns `n` node ids drawn from the candidates, the root and every non-leaf node (a leaf's branch
has ended, so it cannot be continued). All points of one iteration are drawn from the tree as it
stands before that iteration; drawing the same node twice simply gives it two new children.
Strategies only read the tree and draw from `rng`, so a seeded generator makes them reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from treegrpo.tree import Node, Tree

Strategy = Callable[..., list[int]]

STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str) -> Callable[[Strategy], Strategy]:
    """Register an expansion strategy under `name` (selected by `RolloutConfig.strategy`)."""

    def deco(fn: Strategy) -> Strategy:
        if name in STRATEGIES:
            raise ValueError(f"expansion strategy {name!r} is already registered")
        STRATEGIES[name] = fn
        return fn

    return deco


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown expansion strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name]


def candidates(tree: Tree, include_root: bool = True) -> list[Node]:
    """Expansion candidates: the root and the non-leaf nodes (root dropped if asked, unless alone)."""
    cands = tree.internal_nodes()
    if not include_root:
        inner = [c for c in cands if c.parent is not None]
        if inner:
            return inner
    return cands


def _uniform(nodes: list[Node], n: int, rng: np.random.Generator) -> list[int]:
    picks = rng.integers(0, len(nodes), size=n)
    return [nodes[int(i)].id for i in picks]


@register_strategy("random")
def random_points(
    tree: Tree, n: int, rng: np.random.Generator, include_root: bool = True, **_: Any
) -> list[int]:
    """Tree-GRPO default: `n` points uniformly with replacement from root ∪ non-leaf nodes.

    `include_root=False` draws from the non-leaf steps only (falling back to the root when the
    chain ended at its first step); it moves the average branch point deeper and so cheapens it.
    """
    return _uniform(candidates(tree, include_root), n, rng)


@register_strategy("chain")
def chain_points(tree: Tree, n: int, rng: np.random.Generator, **_: Any) -> list[int]:
    """No expansion: the chain baseline samples independent single-chain trees instead."""
    return []


@register_strategy("fixed_depth")
def fixed_depth_points(tree: Tree, n: int, rng: np.random.Generator, depth: int = 1, **_: Any) -> list[int]:
    """Points only at `depth` (0 = the root), uniformly with replacement among candidates there.

    Fallback when the tree has no candidate at `depth` (its branches ended earlier): the deepest
    depth below it that has candidates, so an expansion still happens as close as possible to the
    requested granularity. The root is always a candidate, so this always succeeds.
    """
    if depth < 0:
        raise ValueError(f"fixed_depth depth must be >= 0, got {depth}")
    cands = candidates(tree)
    best = max(c.depth for c in cands if c.depth <= depth)
    return _uniform([c for c in cands if c.depth == best], n, rng)


@register_strategy("depth_stratified")
def depth_stratified_points(tree: Tree, n: int, rng: np.random.Generator, **_: Any) -> list[int]:
    """For each point: a depth uniformly among depths that have candidates, then a node at it.

    Unlike `random`, a bushy level does not crowd out the others: every granularity (early,
    coarse splits and late, fine ones) gets the same share of expansions.
    """
    by_depth: dict[int, list[Node]] = {}
    for c in candidates(tree):
        by_depth.setdefault(c.depth, []).append(c)
    depths = sorted(by_depth)
    out: list[int] = []
    for _ in range(n):
        level = by_depth[depths[int(rng.integers(0, len(depths)))]]
        out.append(level[int(rng.integers(0, len(level)))].id)
    return out


@register_strategy("entropy")
def entropy_points(
    tree: Tree,
    n: int,
    rng: np.random.Generator,
    temperature: float = 1.0,
    by: str = "own",
    **_: Any,
) -> list[int]:
    """Prefer uncertain nodes: `n` draws with replacement, P(node) ∝ softmax(score / temperature).

    score (`by`): "own" = the node's own step mean token entropy (the root, which has no step,
    scores the mean over the other candidates: a neutral prior); "children" = mean of the
    mean entropies of the node's existing children, i.e. how uncertain the step that a new branch
    re-samples was. temperature == 0 means greedy: uniformly among the top-scoring candidates.
    """
    if temperature < 0:
        raise ValueError(f"entropy temperature must be >= 0, got {temperature}")
    if by not in ("own", "children"):
        raise ValueError(f"entropy 'by' must be 'own' or 'children', got {by!r}")
    cands = candidates(tree)
    if by == "own":
        steps = [c.mean_entropy for c in cands if c.parent is not None]
        prior = float(np.mean(steps)) if steps else 0.0
        score = np.array([c.mean_entropy if c.parent is not None else prior for c in cands], dtype=float)
    else:
        score = np.array(
            [
                float(np.mean([tree.nodes[k].mean_entropy for k in c.children])) if c.children else 0.0
                for c in cands
            ],
            dtype=float,
        )
    if not np.isfinite(score).all():
        raise ValueError(f"tree {tree.group_id}/{tree.tree_index}: non-finite mean_entropy on a candidate")
    if temperature == 0:
        top = [c for c, s in zip(cands, score, strict=True) if s == score.max()]
        return _uniform(top, n, rng)
    logits = (score - score.max()) / temperature
    p = np.exp(logits)
    p /= p.sum()
    picks = rng.choice(len(cands), size=n, replace=True, p=p)
    return [cands[int(i)].id for i in picks]
