"""Tree rollout sampler with the scripted policy/env: shapes, strategies, batching, safety nets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from treegrpo.advantage import compute_advantages
from treegrpo.expansion import STRATEGIES, register_strategy
from treegrpo.protocols import Environment, Policy, StepResult, StepSample
from treegrpo.rollout import RolloutConfig, sample_forests
from treegrpo.scripted import ScriptedEnv, ScriptedPolicy
from treegrpo.tree import ActionKind, Forest, group_forests, leaf_arrays, read_jsonl, write_jsonl


class Recorder:
    """Wraps a policy and an env, recording every generate/step call and every context seen."""

    def __init__(self, policy: ScriptedPolicy, env: ScriptedEnv) -> None:
        self.policy, self.env = policy, env
        self.generate_calls: list[int] = []
        self.step_calls: list[int] = []
        self.contexts: set[tuple[int, ...]] = set()
        self.entropy_means: list[float] = []

    # Policy
    def encode_prompt(self, prompt: Any) -> list[int]:
        return self.policy.encode_prompt(prompt)

    def encode_observation(self, text: str) -> list[int]:
        return self.policy.encode_observation(text)

    def generate(self, contexts: Sequence[Sequence[int]]) -> list[StepSample]:
        self.generate_calls.append(len(contexts))
        self.contexts.update(tuple(c) for c in contexts)
        out = self.policy.generate(contexts)
        self.entropy_means.extend(float(np.mean(s.entropies)) for s in out)
        return out

    # Environment
    def start(self, row: Any) -> Any:
        return self.env.start(row)

    def step(self, states: Sequence[Any], actions: Sequence[str]) -> list[StepResult]:
        self.step_calls.append(len(states))
        return self.env.step(states, actions)

    def reward(self, state: Any) -> float:
        return self.env.reward(state)


def run(cfg: RolloutConfig, prompts: int = 8, seed: int = 0, **env_kw: Any) -> tuple[list[Forest], Recorder]:
    env_args = {"steps": 3, "obs_tokens": 5, "prompt_tokens": 10, **env_kw}
    rec = Recorder(ScriptedPolicy(step_tokens=(3, 8), seed=seed), ScriptedEnv(seed=seed, **env_args))
    rows = [{"id": i} for i in range(prompts)]
    res = sample_forests(rows, [f"q{i}" for i in range(prompts)], rec, rec, cfg, rng=seed)
    assert res.budget["policy_calls"] == len(rec.generate_calls)
    return res.forests, rec


def test_recorder_satisfies_the_protocols() -> None:
    rec = Recorder(ScriptedPolicy(), ScriptedEnv())
    assert isinstance(rec, Policy) and isinstance(rec, Environment)
    assert isinstance(ScriptedPolicy(), Policy) and isinstance(ScriptedEnv(), Environment)


@pytest.mark.parametrize(("m", "n", "l"), [(2, 2, 1), (1, 3, 2), (4, 5, 1), (3, 0, 2), (2, 1, 3)])
def test_leaves_per_tree_and_group_size(m: int, n: int, l: int) -> None:  # noqa: E741
    cfg = RolloutConfig(m=m, n=n, l=l)
    forests, _ = run(cfg, answer_prob=0.3, steps=4)
    for f in forests:
        assert len(f.trees) == m
        assert [len(t.leaves()) for t in f.trees] == [1 + n * l] * m
        assert len(f.leaves()) == cfg.group_size == m * (1 + n * l)
        for t in f.trees:
            assert all(leaf.reward is not None for leaf in t.leaves())
            assert all(n.children for n in t.nodes if not n.is_leaf)  # no dangling branch


def test_chain_strategy_builds_independent_chains() -> None:
    forests, _ = run(RolloutConfig(strategy="chain", num_generations=5, m=2, n=3))
    for f in forests:
        assert len(f.trees) == 5
        for t in f.trees:
            assert len(t.leaves()) == 1 and not t.branch_points()


def test_one_generate_and_one_step_call_per_wave() -> None:
    forests, rec = run(RolloutConfig(m=2, n=2, l=1), prompts=6)
    # Init: 12 chains of 3 steps advance together; then 24 expansions of at most 3 steps.
    assert rec.generate_calls[:3] == [12, 12, 12]
    assert rec.generate_calls[3] == 24
    assert len(rec.generate_calls) <= 6
    assert rec.step_calls == rec.generate_calls  # nothing truncated: every step goes to the env
    assert sum(rec.generate_calls) == sum(len(t.nodes) - 1 for f in forests for t in f.trees)


def test_no_shared_prefix_token_is_generated_twice() -> None:
    forests, rec = run(RolloutConfig(m=2, n=3, l=2))
    unique = sum(len(n.token_ids) for f in forests for t in f.trees for n in t.nodes[1:])
    assert rec.policy.generated_tokens == unique
    # Each generated step continued exactly its parent's full context, prompt included.
    for f in forests:
        for t in f.trees:
            for node in t.nodes[1:]:
                assert tuple(t.context_ids(node.parent)) in rec.contexts  # type: ignore[arg-type]


def test_steps_and_observations_are_recorded_as_sampled() -> None:
    forests, rec = run(RolloutConfig(m=2, n=2, l=1), obs_tokens=5)
    means = {round(x, 9) for x in rec.entropy_means}
    for f in forests:
        for t in f.trees:
            for node in t.nodes[1:]:
                assert len(node.logprobs) == len(node.token_ids) > 0
                assert round(node.mean_entropy, 9) in means
                assert node.text == rec.policy.decode(node.token_ids)
                if node.action is ActionKind.SEARCH:
                    assert node.obs_ids == rec.policy.encode_observation(node.observation)
                    assert len(node.obs_ids) == 5 and not node.is_leaf
                else:
                    assert node.is_leaf and node.obs_ids == []


def branch_depths(forests: list[Forest]) -> list[int]:
    return [n.depth for f in forests for t in f.trees for n in t.branch_points()]


def test_random_draws_root_and_covers_every_depth() -> None:
    forests, _ = run(RolloutConfig(m=2, n=2, l=1), prompts=16)
    assert set(branch_depths(forests)) == {0, 1, 2}  # depth 3 is the answer leaf
    # With replacement: some tree drew the same point twice (a node with 3 children).
    assert any(len(n.children) >= 3 for f in forests for t in f.trees for n in t.nodes)


def test_random_without_root_never_branches_at_the_root() -> None:
    forests, _ = run(RolloutConfig(m=2, n=2, l=1, include_root=False), prompts=16)
    assert set(branch_depths(forests)) == {1, 2}


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_fixed_depth_branches_only_at_its_depth(depth: int) -> None:
    forests, _ = run(RolloutConfig(m=2, n=2, l=2, strategy="fixed_depth", fixed_depth=depth))
    assert set(branch_depths(forests)) == {depth}


def test_fixed_depth_falls_back_to_the_deepest_shallower_depth() -> None:
    forests, _ = run(RolloutConfig(m=2, n=2, l=1, strategy="fixed_depth", fixed_depth=7))
    assert set(branch_depths(forests)) == {2}


def expansion_points(forests: list[Forest]) -> list[tuple[Any, int]]:
    """(tree, point) per expansion of a single iteration: new nodes (ids > 3) hanging off the initial chain."""
    return [(t, n.parent) for f in forests for t in f.trees for n in t.nodes[4:] if n.parent < 4]  # type: ignore[operator]


def test_depth_stratified_spreads_over_depths() -> None:
    forests, _ = run(RolloutConfig(m=2, n=4, l=1, strategy="depth_stratified"), prompts=16)
    counts = np.bincount([t.nodes[p].depth for t, p in expansion_points(forests)])
    assert len(counts) == 3 and counts.sum() == 16 * 2 * 4
    assert counts.min() > 0.2 * counts.sum()  # ≈ 1/3 each


def test_entropy_greedy_expands_the_most_uncertain_step() -> None:
    forests, _ = run(RolloutConfig(m=2, n=2, l=1, strategy="entropy", entropy_temperature=0.0))
    points = expansion_points(forests)
    assert len(points) == 8 * 2 * 2
    for t, p in points:
        chain = [t.nodes[1].mean_entropy, t.nodes[2].mean_entropy]  # the initial chain's non-leaf steps
        scores = [float(np.mean(chain)), *chain]  # the root scores the mean (neutral prior)
        assert scores[p] == max(scores)


def test_entropy_softmax_prefers_high_entropy_nodes() -> None:
    cfg = RolloutConfig(m=2, n=6, l=1, strategy="entropy", entropy_temperature=0.3)
    forests, _ = run(cfg, prompts=16)
    points = expansion_points(forests)
    top = [p == max((1, 2), key=lambda i: t.nodes[i].mean_entropy) for t, p in points]
    assert len(points) == 16 * 2 * 6 and sum(top) > 0.6 * len(top)


def test_same_seed_same_forests_and_different_seed_differs() -> None:
    a, _ = run(RolloutConfig(m=2, n=2, l=2), seed=5)
    b, _ = run(RolloutConfig(m=2, n=2, l=2), seed=5)
    c, _ = run(RolloutConfig(m=2, n=2, l=2), seed=6)
    dump = lambda fs: [t.to_dict() for f in fs for t in f.trees]  # noqa: E731
    assert dump(a) == dump(b)
    assert dump(a) != dump(c)


def test_jsonl_round_trip_of_sampled_trees(tmp_path: Path) -> None:
    forests, _ = run(RolloutConfig(m=2, n=2, l=1), answer_prob=0.3, steps=5)
    path = tmp_path / "rollout.jsonl"
    write_jsonl([t for f in forests for t in f.trees], path)
    back = group_forests(read_jsonl(path))
    assert [[t.to_dict() for t in f.trees] for f in back] == [[t.to_dict() for t in f.trees] for f in forests]
    r1, g1, t1 = leaf_arrays(forests)
    r2, g2, t2 = leaf_arrays(back)
    np.testing.assert_array_equal(compute_advantages(r1, g1, t1), compute_advantages(r2, g2, t2))


def test_sampled_advantages_are_finite_and_informative() -> None:
    forests, _ = run(RolloutConfig(m=2, n=2, l=1), prompts=16)
    r, g, t = leaf_arrays(forests)
    adv = compute_advantages(r, g, t)
    assert np.all(np.isfinite(adv)) and np.abs(adv).max() > 0.5


def test_tool_calls_and_failures_are_counted() -> None:
    policy = ScriptedPolicy(step_tokens=4, seed=2)
    env = ScriptedEnv(steps=4, obs_tokens=3, prompt_tokens=5, fail_prob=0.5, seed=2)
    res = sample_forests([{"id": i} for i in range(6)], [str(i) for i in range(6)], policy, env, rng=2)
    searches = [n for f in res.forests for t in f.trees for n in t.nodes if n.action is ActionKind.SEARCH]
    fails = [n for n in searches if n.observation.startswith("error")]
    assert res.budget["tool_calls"] == len(searches)
    assert res.budget["tool_failures"] == len(fails) > 0


def test_max_context_tokens_truncates_cleanly() -> None:
    # prompt 10, steps of 4..8 tokens, observations of 5: a 3-step chain needs up to 10+13+13+8 = 44.
    cfg = RolloutConfig(m=2, n=2, l=1, max_context_tokens=25)
    forests, _ = run(cfg)
    truncated = 0
    for f in forests:
        for t in f.trees:
            assert len(t.leaves()) == 1 + 2
            for leaf in t.leaves():
                assert len(t.path(leaf.id).token_ids) <= 25
                if leaf.action is ActionKind.TRUNCATED:
                    truncated += 1
                    assert leaf.reward == 0.0  # the scripted env's reward of an unfinished episode
    assert truncated > 0


def test_wave_cap_ends_runaway_branches() -> None:
    forests, rec = run(RolloutConfig(m=1, n=1, l=1, max_waves=2), steps=10)
    assert len(rec.generate_calls) == 4
    for f in forests:
        t = f.trees[0]
        assert all(leaf.action is ActionKind.TRUNCATED for leaf in t.leaves())
        assert len(t.leaves()) == 2


def test_bad_configuration_and_input_raise_clear_errors() -> None:
    pol, env = ScriptedPolicy(), ScriptedEnv(prompt_tokens=10)
    with pytest.raises(ValueError, match="rows but"):
        sample_forests([{"id": 1}], ["a", "b"], pol, env)
    with pytest.raises(ValueError, match="unique"):
        sample_forests([{"id": 1}, {"id": 2}], ["a", "a"], pol, env)
    with pytest.raises(ValueError, match="unknown expansion strategy"):
        sample_forests([{"id": 1}], ["a"], pol, env, RolloutConfig(strategy="bogus"))
    with pytest.raises(ValueError, match="rollout.m"):
        sample_forests([{"id": 1}], ["a"], pol, env, RolloutConfig(m=0))
    with pytest.raises(ValueError, match=r"row 0 \(a\): prompt has 10 tokens"):
        sample_forests([{"id": 1}], ["a"], pol, env, RolloutConfig(max_context_tokens=10))
    with pytest.raises(ValueError, match="'id' field"):
        sample_forests([{"question": "x"}], ["a"], pol, env)


def test_a_strategy_choosing_a_leaf_is_rejected() -> None:
    @register_strategy("_test_leaf")
    def pick_leaf(tree, n, rng, **_):  # type: ignore[no-untyped-def]
        return [tree.leaves()[0].id] * n

    try:
        with pytest.raises(ValueError, match="not an expansion candidate"):
            run(RolloutConfig(strategy="_test_leaf"))
    finally:
        STRATEGIES.pop("_test_leaf")
