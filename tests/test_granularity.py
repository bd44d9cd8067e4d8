"""Granularity analysis: exact numbers on hand-built forests, and the expansion strategies' signatures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from treegrpo.advantage import compute_advantages
from treegrpo.granularity import (
    branch_stats,
    granularity_metrics,
    inter_tree_signal,
    per_depth,
    summarize_run,
)
from treegrpo.rollout import RolloutConfig, sample_forests
from treegrpo.scripted import ScriptedEnv, ScriptedPolicy
from treegrpo.tree import ActionKind, Forest, Tree

G = "granularity/"


def _leaf(tree: Tree, parent: int, reward: float) -> int:
    return tree.add_child(parent, token_ids=[1], action=ActionKind.ANSWER, is_leaf=True, reward=reward).id


def _step(tree: Tree, parent: int) -> int:
    return tree.add_child(parent, token_ids=[1], action=ActionKind.SEARCH).id


def _t1(group: str = "g") -> Tree:
    """root → a → {leaf 1.0, leaf 0.0};  root → b → leaf 0.2   (branch points at depths 0 and 1)."""
    t = Tree.new(group, 0, [5])
    a = _step(t, 0)
    b = _step(t, 0)
    _leaf(t, a, 1.0)
    _leaf(t, a, 0.0)
    _leaf(t, b, 0.2)
    return t


def _chain(group: str, index: int, reward: float, steps: int = 2) -> Tree:
    t = Tree.new(group, index, [5])
    p = 0
    for _ in range(steps - 1):
        p = _step(t, p)
    _leaf(t, p, reward)
    return t


def _t3(group: str = "h") -> Tree:
    """A chain of two steps, then a 3-way split at depth 2: leaves 1, 1, 0."""
    t = Tree.new(group, 0, [5])
    p = _step(t, _step(t, 0))
    for r in (1.0, 1.0, 0.0):
        _leaf(t, p, r)
    return t


def test_branch_stats_by_hand() -> None:
    stats = branch_stats(_t1())
    assert [(s.node_id, s.depth) for s in stats] == [(0, 0), (1, 1)]
    root, a = stats
    # V(a) = 0.5 (2 leaves), V(b) = 0.2 (1 leaf), V(root) = 0.4
    assert root.value == pytest.approx(0.4)
    assert root.child_values == pytest.approx((0.5, 0.2))
    assert root.child_leaves == (2, 1)
    assert root.spread == pytest.approx(0.3)
    assert root.signal == pytest.approx(2 * 0.1 + 1 * 0.2)
    assert a.spread == pytest.approx(1.0)
    assert a.signal == pytest.approx(1.0)  # two single leaves: |R1 - R2|
    s3 = branch_stats(_t3())
    assert [(s.depth, s.leaves) for s in s3] == [(2, 3)]
    assert s3[0].signal == pytest.approx(1 / 3 + 1 / 3 + 2 / 3)


def test_forest_metrics_exact() -> None:
    f1 = Forest("g", [_t1(), _chain("g", 1, 1.0)])
    f2 = Forest("h", [_t3()])
    m = granularity_metrics([f1, f2])
    assert per_depth(m, "branch_depth_hist") == {0: 1.0, 1: 1.0, 2: 1.0}
    total = 0.4 + 1.0 + 4 / 3
    assert m[G + "signal_total"] == pytest.approx(total)
    shares = per_depth(m, "signal_share")
    assert shares == pytest.approx({0: 0.4 / total, 1: 1.0 / total, 2: (4 / 3) / total})
    assert sum(shares.values()) == pytest.approx(1.0)
    assert m[G + "branch_points"] == 3
    assert m[G + "informative_branch_points"] == 3
    assert m[G + "mean_branch_depth"] == pytest.approx(1.0)
    assert m[G + "trees"] == 3 and m[G + "leaves"] == 3 + 1 + 3
    assert m[G + "signal_per_tree"] == pytest.approx(total / 3)
    assert m[G + "signal_mean_depth"] == pytest.approx((1.0 + 2 * 4 / 3) / total)
    assert per_depth(m, "spread_mean") == pytest.approx({0: 0.3, 1: 1.0, 2: 1.0})
    # inter: f1 trees V=0.4 (3 leaves) and 1.0 (1 leaf), forest mean 0.55; f2 has a single tree
    assert inter_tree_signal(f1) == pytest.approx(3 * 0.15 + 0.45)
    assert m[G + "inter_signal_total"] == pytest.approx(0.9)
    # every value is a plain finite float and survives JSON
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert json.loads(json.dumps(m)) == m


def test_trees_accepted_directly_and_uninformative_split() -> None:
    t = Tree.new("g", 0, [5])
    for _ in range(2):
        _leaf(t, 0, 0.2)
    m = granularity_metrics([t])
    assert m[G + "branch_points"] == 1 and m[G + "informative_branch_points"] == 0
    assert m[G + "signal_total"] == 0.0 and m[G + "signal_share/d0"] == 0.0
    assert m[G + "signal_mean_depth"] == 0.0


def test_chain_forests_give_zeros_not_nan() -> None:
    f = Forest("g", [_chain("g", i, r, steps=3) for i, r in enumerate([1.0, 0.0, 0.2, 0.0])])
    m = granularity_metrics([f])
    assert m[G + "branch_points"] == 0
    assert m[G + "signal_total"] == 0
    assert m[G + "mean_branch_depth"] == 0
    assert per_depth(m, "branch_depth_hist") == {0: 0.0, 1: 0.0, 2: 0.0}  # every depth a split could be
    assert per_depth(m, "signal_share") == {0: 0.0, 1: 0.0, 2: 0.0}
    assert m[G + "inter_signal_total"] > 0  # chain GRPO's only signal is between trees
    assert all(math.isfinite(v) for v in m.values())
    empty = granularity_metrics([])
    assert empty[G + "branch_points"] == 0 and empty[G + "signal_share/d0"] == 0
    assert all(math.isfinite(v) for v in empty.values())


def test_unfinished_leaf_is_a_clear_error() -> None:
    t = Tree.new("g", 0, [5])
    t.add_child(0, token_ids=[1], is_leaf=True)  # no reward
    t.add_child(0, token_ids=[1], is_leaf=True, reward=1.0)
    with pytest.raises(ValueError, match="leaf 1"):
        granularity_metrics([t])
    with pytest.raises(ValueError, match="Forest or Tree"):
        granularity_metrics(["not a tree"])  # type: ignore[list-item]


def _random_tree(rng: np.random.Generator, index: int) -> Tree:
    t = Tree.new("g", index, [5])
    frontier = [0]
    while frontier:
        p = frontier.pop()
        depth = t.nodes[p].depth
        for _ in range(int(rng.integers(1, 4))):
            if depth >= 3 or rng.random() < 0.3:
                _leaf(t, p, float(rng.choice([0.0, 0.1, 0.2, 0.8, 1.0])))
            else:
                frontier.append(_step(t, p))
    return t


def test_signal_is_the_intra_credit_created_at_the_split() -> None:
    """S(p)/(σ+eps) = Σ_i |C(c_i) − n_i/n_p · C(p)|, C = sum of intra-tree advantages of leaves below."""
    rng = np.random.default_rng(0)
    checked = 0
    for k in range(40):
        t = _random_tree(rng, k)
        leaves = t.leaves()
        r = [float(leaf.reward) for leaf in leaves]  # type: ignore[arg-type]
        if len(r) < 2 or np.std(r) == 0:
            continue
        eps = 1e-6
        adv = compute_advantages(r, [0] * len(r), [0] * len(r), "tree_intra", eps)
        a = {leaf.id: x for leaf, x in zip(leaves, adv, strict=True)}

        def credit(x: int, t: Tree = t, a: dict[int, float] = a) -> float:
            return sum(a[i] for i in t.leaves_below(x))

        sigma = float(np.std(r, ddof=1))
        for s in branch_stats(t):
            n_p = len(t.leaves_below(s.node_id))
            created = sum(
                abs(credit(c) - len(t.leaves_below(c)) / n_p * credit(s.node_id))
                for c in t.nodes[s.node_id].children
            )
            assert created == pytest.approx(s.signal / (sigma + eps), abs=1e-9)
            checked += 1
    assert checked > 20


def _sample(strategy: str, prompts: int = 12, **kw: object) -> list[Forest]:
    cfg = RolloutConfig(m=2, n=2, l=1, strategy=strategy, **kw)  # type: ignore[arg-type]
    policy = ScriptedPolicy(step_tokens=3, seed=1)
    env = ScriptedEnv(steps=3, obs_tokens=4, prompt_tokens=6, seed=2)
    rows = [{"id": i} for i in range(prompts)]
    return sample_forests(rows, [f"p{i}" for i in range(prompts)], policy, env, cfg, rng=3).forests


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_fixed_depth_puts_all_signal_at_that_depth(depth: int) -> None:
    m = granularity_metrics(_sample("fixed_depth", fixed_depth=depth))
    hist = per_depth(m, "branch_depth_hist")
    assert hist[depth] > 0
    assert all(v == 0 for d, v in hist.items() if d != depth)
    assert m[G + "signal_total"] > 0
    assert m[G + f"signal_share/d{depth}"] == pytest.approx(1.0)
    assert m[G + "mean_branch_depth"] == depth


def test_random_expansion_reaches_every_depth() -> None:
    m = granularity_metrics(_sample("random", prompts=16))
    hist = per_depth(m, "branch_depth_hist")
    assert set(hist) == {0, 1, 2}  # a 3-step task: steps at depths 1..3, the last one a leaf
    assert all(hist[d] > 0 for d in (0, 1, 2)), hist
    shares = per_depth(m, "signal_share")
    assert all(shares[d] > 0 for d in (0, 1, 2)), shares
    assert sum(shares.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "strategy,kw",
    [("depth_stratified", {}), ("entropy", {}), ("chain", {"num_generations": 4})],
)
def test_every_strategy_gives_finite_metrics(strategy: str, kw: dict[str, object]) -> None:
    m = granularity_metrics(_sample(strategy, **kw))
    assert all(math.isfinite(v) for v in m.values())
    shares = sum(per_depth(m, "signal_share").values())
    if strategy == "chain":
        assert m[G + "branch_points"] == 0 and shares == 0
        assert m[G + "inter_signal_total"] > 0
    else:
        assert m[G + "branch_points"] > 0 and shares == pytest.approx(1.0)


def test_summarize_run_equals_metrics_of_the_union() -> None:
    """Signal and counts are additive, so summing per-step rows must match one pass over all forests."""
    a = _sample("random", prompts=6)
    b = _sample("fixed_depth", prompts=5, fixed_depth=2)
    rows = [
        {"step": 0, "eval/em": 0.5},  # no granularity keys: ignored
        {"step": 1, **json.loads(json.dumps(granularity_metrics(a)))},
        {"step": 2, **granularity_metrics(b)},
    ]
    s = summarize_run(rows)
    u = granularity_metrics(a + b)
    run = G + "run/"
    assert s[run + "steps"] == 2
    assert s[run + "branch_points"] == u[G + "branch_points"]
    assert s[run + "mean_branch_depth"] == pytest.approx(u[G + "mean_branch_depth"])
    assert s[run + "signal_total"] == pytest.approx(u[G + "signal_total"])
    assert s[run + "spread_mean"] == pytest.approx(u[G + "spread_mean"])
    assert s[run + "signal_mean_depth"] == pytest.approx(u[G + "signal_mean_depth"])
    for d, share in per_depth(u, "signal_share").items():
        assert s[run + f"signal_share/d{d}"] == pytest.approx(share)
        assert s[run + f"branch_depth_hist/d{d}"] == u[G + f"branch_depth_hist/d{d}"]
    assert summarize_run([{"step": 0, "eval/em": 0.0}]) == {}
