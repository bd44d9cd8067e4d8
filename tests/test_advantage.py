"""Advantage estimators: SPEC §5 exactly, closed forms, properties, speed, and bad input."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treegrpo.advantage import (
    ESTIMATORS,
    compute_advantages,
    group_zscore,
    node_value_advantages,
    register_estimator,
)
from treegrpo.tree import Tree

EPS = 1e-6
R = [1.0, 0.2, 0.0, 0.2, 0.2, 1.0]
G = [0] * 6
T = [0, 0, 0, 1, 1, 1]


def z(x: np.ndarray) -> np.ndarray:
    """Direct, loop-free reference z-score of one group (SPEC conventions)."""
    if len(x) == 1:
        return x / (1.0 + EPS)
    if np.all(x == x[0]):
        return np.zeros_like(x)
    return (x - x.mean()) / (x.std(ddof=1) + EPS)


def test_spec_worked_example() -> None:
    inter = compute_advantages(R, G, T, "tree_inter")
    intra = compute_advantages(R, G, T, "tree_intra")
    tree = compute_advantages(R, G, T)  # the default is "tree"
    np.testing.assert_allclose(inter, [1.271, -0.523, -0.972, -0.523, -0.523, 1.271], atol=1e-3)
    np.testing.assert_allclose(intra, [1.134, -0.378, -0.756, -0.577, -0.577, 1.155], atol=1e-3)
    np.testing.assert_allclose(tree, [2.405, -0.901, -1.728, -1.101, -1.101, 2.426], atol=1e-3)
    np.testing.assert_allclose(tree, inter + intra, atol=1e-12)


def test_tree_on_chains_is_reward_plus_group_zscore() -> None:
    # Every tree has one leaf, so its intra group has mean 0, std 1: A_intra = R/(1+eps), and
    # A_tree = R/(1+eps) + z_group(R): GRPO plus a raw-reward term (not GRPO itself).
    rewards = np.array([1.0, 0.0, 0.2, 0.8, 0.1, 0.1, 1.0])
    groups = np.array([0, 0, 0, 0, 1, 1, 1])
    trees = np.array([0, 1, 2, 3, 0, 1, 2])
    got = compute_advantages(rewards, groups, trees, "tree")
    expected = rewards / (1 + EPS) + np.concatenate([z(rewards[:4]), z(rewards[4:])])
    np.testing.assert_allclose(got, expected, atol=1e-9)
    np.testing.assert_allclose(
        compute_advantages(rewards, groups, trees, "tree_intra"), rewards / (1 + EPS), atol=1e-12
    )


def test_grpo_rloo_2norm_match_direct_formulas() -> None:
    rng = np.random.default_rng(3)
    rewards = rng.choice([0.0, 0.1, 0.2, 0.8, 1.0], size=40)
    groups = np.repeat(np.arange(5), 8)
    trees = np.tile(np.repeat([0, 1], 4), 5)
    grpo = compute_advantages(rewards, groups, trees, "grpo")
    rloo = compute_advantages(rewards, groups, trees, "rloo")
    two = compute_advantages(rewards, groups, trees, "tree_2norm")
    for g in range(5):
        sel = groups == g
        x = rewards[sel]
        np.testing.assert_allclose(grpo[sel], z(x), atol=1e-9)
        loo = np.array([x[i] - np.delete(x, i).mean() for i in range(len(x))])
        np.testing.assert_allclose(rloo[sel], loo, atol=1e-12)
        zg = z(x)
        for t in (0, 1):
            in_t = trees[sel] == t
            np.testing.assert_allclose(two[sel][in_t], z(zg[in_t]), atol=1e-9)


def test_singleton_and_constant_groups() -> None:
    adv = compute_advantages([0.7], [0], [0], "grpo")
    np.testing.assert_allclose(adv, [0.7 / (1 + EPS)])
    assert compute_advantages([0.7], [0], [0], "rloo")[0] == pytest.approx(0.7)
    # 0.1 * 3 does not round-trip through the mean exactly; constant groups must still be exactly 0.
    for name in ESTIMATORS:
        adv = compute_advantages([0.1, 0.1, 0.1, 0.1], [5, 5, 5, 5], [0, 0, 1, 1], name)
        assert np.all(np.isfinite(adv))
        assert np.all(adv == 0.0), name


def test_string_ids_and_empty_input() -> None:
    a = compute_advantages(R, ["q"] * 6, ["a", "a", "a", "b", "b", "b"])
    np.testing.assert_allclose(a, compute_advantages(R, G, T), atol=1e-12)
    assert compute_advantages([], [], []).shape == (0,)


def test_tree_ids_are_scoped_to_their_group() -> None:
    # Tree 0 of group 0 and tree 0 of group 1 are different trees.
    a = compute_advantages([1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1], [0, 0, 0, 0], "tree_intra")
    expected = np.concatenate([z(np.array([1.0, 0.0])), z(np.array([0.0, 1.0]))])
    np.testing.assert_allclose(a, expected, atol=1e-9)
    assert a[0] > 0 > a[1] and a[2] < 0 < a[3]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards_raise(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        compute_advantages([1.0, bad, 0.0], [0, 0, 0], [0, 0, 1])


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages(R, G, T, "nope")
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages(R, G[:5], T)
    with pytest.raises(ValueError, match="tree_ids"):
        compute_advantages(R, G, [T])


def test_registry_accepts_new_estimators_and_rejects_duplicates() -> None:
    @register_estimator("_test_negated_grpo")
    def neg(r, g, t, eps):  # type: ignore[no-untyped-def]
        return -group_zscore(r, g, eps)

    try:
        np.testing.assert_allclose(
            compute_advantages(R, G, T, "_test_negated_grpo"), -compute_advantages(R, G, T, "grpo")
        )
        with pytest.raises(ValueError, match="already registered"):
            register_estimator("grpo")(neg)
    finally:
        ESTIMATORS.pop("_test_negated_grpo")


# --- properties on random forests -------------------------------------------------------------

forest_strategy = st.lists(  # groups → trees → leaf rewards (in hundredths, so shifts are exact-ish)
    st.lists(st.lists(st.integers(-500, 500), min_size=2, max_size=5), min_size=1, max_size=4),
    min_size=1,
    max_size=5,
)


def flatten(forest: list[list[list[int]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, t = [], [], []
    for gi, trees in enumerate(forest):
        for ti, leaves in enumerate(trees):
            for x in leaves:
                r.append(x / 100.0)
                g.append(gi)
                t.append(ti)
    return np.array(r), np.array(g), np.array(t)


@settings(max_examples=60, deadline=None)
@given(forest_strategy)
def test_intra_sums_to_zero_in_every_tree(forest: list[list[list[int]]]) -> None:
    r, g, t = flatten(forest)
    a = compute_advantages(r, g, t, "tree_intra")
    key = g * 10 + t
    for k in np.unique(key):
        assert abs(a[key == k].sum()) < 1e-6


@settings(max_examples=60, deadline=None)
@given(forest_strategy, st.randoms(use_true_random=False), st.integers(-300, 300))
def test_permutation_and_shift_invariance(forest: list[list[list[int]]], rnd, shift: int) -> None:  # type: ignore[no-untyped-def]
    r, g, t = flatten(forest)
    perm = list(range(len(r)))
    rnd.shuffle(perm)
    p = np.array(perm)
    for name in ESTIMATORS:
        a = compute_advantages(r, g, t, name)
        np.testing.assert_allclose(compute_advantages(r[p], g[p], t[p], name), a[p], atol=1e-7, err_msg=name)
        shifted = compute_advantages(r + shift / 4.0, g, t, name)
        np.testing.assert_allclose(shifted, a, atol=1e-6, err_msg=name)


def test_speed_100k_leaves() -> None:
    rng = np.random.default_rng(0)
    n = 100_002
    r = rng.choice([0.0, 0.1, 0.2, 0.8, 1.0], size=n)
    g = np.repeat(np.arange(n // 6), 6)
    t = np.tile([0, 0, 0, 1, 1, 1], n // 6)
    start = time.perf_counter()
    a = compute_advantages(r, g, t, "tree")
    elapsed = time.perf_counter() - start
    assert np.all(np.isfinite(a))
    assert elapsed < 1.0, f"100k leaves took {elapsed:.3f}s"


# --- node values ------------------------------------------------------------------------------


def small_tree() -> Tree:
    """root → a → {b (leaf 1.0), c → {d (leaf 0.0), e (leaf 0.5)}}; root → f (leaf 0.2)."""
    t = Tree.new("q", 0, [1, 2, 3])
    a = t.add_child(0, token_ids=[4])
    t.add_child(a.id, token_ids=[5], is_leaf=True, reward=1.0)
    c = t.add_child(a.id, token_ids=[6])
    t.add_child(c.id, token_ids=[7], is_leaf=True, reward=0.0)
    t.add_child(c.id, token_ids=[8], is_leaf=True, reward=0.5)
    t.add_child(0, token_ids=[9], is_leaf=True, reward=0.2)
    return t


def test_node_value_advantages() -> None:
    nv = node_value_advantages(small_tree())
    v = np.array([(1.0 + 0.0 + 0.5 + 0.2) / 4, 0.5, 1.0, 0.25, 0.0, 0.5, 0.2])
    np.testing.assert_allclose(nv["value"], v)
    parent = [0, 0, 1, 1, 3, 3, 0]
    np.testing.assert_allclose(nv["local"], v - v[parent])
    np.testing.assert_allclose(nv["global"], v - v[0])
    np.testing.assert_allclose(nv["leaves"], [4, 3, 1, 2, 1, 1, 1])
    scaled = node_value_advantages(small_tree(), sqrt_leaves=True)
    np.testing.assert_allclose(scaled["local"], (v - v[parent]) / np.sqrt(nv["leaves"]))


def test_node_value_rejects_unfinished_or_bad_trees() -> None:
    t = small_tree()
    t.nodes[2].reward = None
    with pytest.raises(ValueError, match="leaf 2"):
        node_value_advantages(t)
    t = small_tree()
    t.nodes[6].reward = float("nan")
    with pytest.raises(ValueError, match="leaf 6"):
        node_value_advantages(t)
    t = Tree.new("q", 0, [1])
    t.add_child(0, token_ids=[2])  # a step whose branch never finished
    with pytest.raises(ValueError, match="no finished leaf"):
        node_value_advantages(t)
