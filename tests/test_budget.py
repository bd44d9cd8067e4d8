"""Budget accounting: hand-counted trees, and the sampler's fixed-length configurations."""

from __future__ import annotations

from treegrpo.budget import TREE_KEYS, batch_budget, forest_budget, forests_budget, tree_budget
from treegrpo.rollout import RolloutConfig, sample_forests
from treegrpo.scripted import ScriptedEnv, ScriptedPolicy
from treegrpo.tree import Forest, Tree

ROWS = [{"id": i} for i in range(5)]
IDS = [f"q{i}" for i in range(5)]


def hand_tree() -> Tree:
    """prompt(3) → a(gen 2, obs 4) → {b (gen 1, leaf), c (gen 2, obs 1) → d (gen 3, leaf)}."""
    t = Tree.new("q", 0, [1, 2, 3])
    a = t.add_child(0, token_ids=[4, 5], logprobs=[0, 0], obs_ids=[6, 7, 8, 9])
    t.add_child(a.id, token_ids=[10], logprobs=[0], is_leaf=True, reward=1.0)
    c = t.add_child(a.id, token_ids=[11, 12], logprobs=[0, 0], obs_ids=[13])
    t.add_child(c.id, token_ids=[14, 15, 16], logprobs=[0, 0, 0], is_leaf=True, reward=0.0)
    return t


def test_tree_budget_by_hand() -> None:
    b = tree_budget(hand_tree())
    assert b["generated_tokens"] == 2 + 1 + 2 + 3
    assert b["observation_tokens"] == 4 + 1
    assert b["sequences_generated"] == 4
    # contexts: a sees 3, b sees 9, c sees 9, d sees 12
    assert b["prefill_tokens_no_reuse"] == 3 + 9 + 9 + 12
    assert b["observation_prefill"] == 4 + 1
    assert b["trajectories"] == 2
    assert b["trained_tokens_unique"] == 3 + 6 + 1 + 3 + 3
    assert b["trained_tokens_total"] == (3 + 6 + 1) + (3 + 6 + 3 + 3)
    assert b["loss_tokens_unique"] == 8
    assert b["loss_tokens_total"] == (2 + 1) + (2 + 2 + 3)


def test_forest_shares_the_prompt_once() -> None:
    one = forest_budget(Forest("q", [hand_tree()]))
    two = forest_budget(Forest("q", [hand_tree(), hand_tree()]), {"tool_calls": 3})
    assert one["prefill_tokens"] == 3 + 5
    assert two["prefill_tokens"] == 3 + 2 * 5  # prompt once, each tree's observations once
    assert two["prefill_tokens_no_reuse"] == 2 * one["prefill_tokens_no_reuse"]
    assert two["tool_calls"] == 3 and two["trees"] == 2
    batch = batch_budget([one, two], policy_calls=7)
    assert batch["generated_tokens"] == 3 * 8
    assert batch["prompts"] == 2 and batch["policy_calls"] == 7


def run(cfg: RolloutConfig, seed: int = 0):  # type: ignore[no-untyped-def]
    env = ScriptedEnv(steps=3, obs_tokens=50, prompt_tokens=200)
    return sample_forests(ROWS, IDS, ScriptedPolicy(step_tokens=100, seed=seed), env, cfg, rng=seed)


def test_chain_baseline_counts() -> None:
    res = run(RolloutConfig(strategy="chain", num_generations=4))
    for b in res.per_prompt:
        assert b["trajectories"] == 4
        assert b["generated_tokens"] == 4 * 300
        assert b["observation_tokens"] == 4 * 100
        assert b["prefill_tokens_no_reuse"] == 4 * (200 + 350 + 500)
        assert b["prefill_tokens"] == 200 + 4 * 100
        assert b["tool_calls"] == 4 * 2
        assert b["policy_calls"] == 3
        assert b["trained_tokens_unique"] == b["trained_tokens_total"] == 4 * 600
    assert res.budget["policy_calls"] == 3  # waves are shared by all prompts
    assert res.budget["generated_tokens"] == 5 * 1200


def test_tree_at_fixed_depth_two_counts() -> None:
    res = run(RolloutConfig(m=2, n=2, l=1, strategy="fixed_depth", fixed_depth=2))
    for b in res.per_prompt:
        assert b["trajectories"] == 6
        assert b["generated_tokens"] == 2 * 300 + 4 * 100
        assert b["prefill_tokens"] == 200 + 2 * 2 * 50
        assert b["prefill_tokens_no_reuse"] == 2 * 1050 + 4 * 500
        assert b["trained_tokens_total"] == 6 * 600
        assert b["trained_tokens_unique"] == 2 * (200 + 150 + 150 + 100 + 2 * 100)
        assert b["tool_calls"] == 2 * 2  # the answering expansions call no tool
    assert res.budget["policy_calls"] == 3 + 1


def test_root_expansions_cost_full_chains() -> None:
    res = run(RolloutConfig(m=2, n=2, l=1, strategy="fixed_depth", fixed_depth=0))
    for b in res.per_prompt:
        assert b["generated_tokens"] == 6 * 300  # no sharing below the prompt
        assert b["prefill_tokens"] == 200 + 6 * 100  # but the prompt is still prefilled once


def test_budget_from_trees_matches_sampler_and_policy() -> None:
    policy = ScriptedPolicy(step_tokens=(20, 60), seed=4)
    env = ScriptedEnv(steps=4, obs_tokens=7, prompt_tokens=30, answer_prob=0.3, seed=4)
    res = sample_forests(ROWS, IDS, policy, env, RolloutConfig(m=3, n=2, l=2), rng=4)
    assert res.budget["generated_tokens"] == policy.generated_tokens
    assert res.budget["prefill_tokens_no_reuse"] == policy.context_tokens
    assert res.budget["prefill_tokens_reported"] == policy.context_tokens
    assert res.budget["policy_calls"] == len(policy.calls)
    assert res.budget["sequences_generated"] == sum(policy.calls)
    assert res.budget["trained_tokens_unique"] < res.budget["trained_tokens_total"]
    trees_only = forests_budget(res.forests)
    assert {k: trees_only[k] for k in TREE_KEYS} == {k: res.budget[k] for k in TREE_KEYS}
    assert trees_only["prefill_tokens"] == res.budget["prefill_tokens"]


def test_expected_generation_per_trajectory_matches_theory() -> None:
    # 3-step chains: root/depth-1/depth-2 points leave 3/2/1 steps to generate, mean 2 with the root,
    # mean 1.5 without it. (2,2,1): (2·3 + 4·2)/6 = 7/3 steps per trajectory vs 3 → 7/9; no root: 2/3.
    rows = [{"id": i} for i in range(300)]
    ids = [str(i) for i in range(300)]
    env = ScriptedEnv(steps=3, obs_tokens=2, prompt_tokens=4)
    for include_root, expected in ((True, 7 / 9), (False, 2 / 3)):
        cfg = RolloutConfig(m=2, n=2, l=1, include_root=include_root)
        res = sample_forests(rows, ids, ScriptedPolicy(step_tokens=10, seed=1), env, cfg, rng=1)
        ratio = res.budget["generated_tokens"] / res.budget["trajectories"] / 30
        assert abs(ratio - expected) < 0.02, (include_root, ratio)
