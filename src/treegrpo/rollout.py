"""Tree rollout sampler (SPEC §3): M trees per prompt, one chain each, then L expansion rounds.

Every active branch of every tree and prompt advances together, one agent step per "wave": a wave is
exactly one `policy.generate` call and one `env.step` call, so model batches and tool calls are
batched across the whole batch. A branch from node X starts from X's environment state (states are
immutable values) and from the context `tree.context_ids(X)`; the environment decides when a branch
is done. Sampled ids are kept as ids; observations are tokenized once with
`policy.encode_observation` and appended.

Safety nets, so a misbehaving policy/env ends branches cleanly instead of crashing a run:
- `max_context_tokens`: a step that would overflow it is cut to fit and becomes a TRUNCATED leaf
  (the environment does not see it; reward = env.reward of the branch's state); an observation that
  would leave no room for another token is cut and its node becomes a TRUNCATED leaf.
- `max_waves` per phase: branches still running then end at their last node (TRUNCATED).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from treegrpo.budget import SAMPLER_KEYS, batch_budget, forest_budget
from treegrpo.errors import UserError
from treegrpo.expansion import get_strategy
from treegrpo.protocols import Environment, Policy, env_stop_strings
from treegrpo.tree import ActionKind, Forest, Tree


class PromptTooLongError(UserError, ValueError):
    """A prompt leaves no room to generate: a data/config problem, reported as one line naming the row."""


@dataclass
class RolloutConfig:
    """Shape of the rollout. Tree: G = m·(1 + n·l) leaves per prompt; `chain`: `num_generations`."""

    m: int = 2  # trees per prompt
    n: int = 2  # expansion points per tree per iteration
    l: int = 1  # noqa: E741  expansion iterations
    strategy: str = "random"
    num_generations: int = 4  # chains per prompt for strategy "chain"
    fixed_depth: int = 1  # depth for strategy "fixed_depth"
    entropy_temperature: float = 1.0  # strategy "entropy": softmax temperature (0 = greedy)
    entropy_by: str = "own"  # strategy "entropy": score a node by its own step or by its children
    include_root: bool = True  # strategy "random": may the root be drawn
    max_context_tokens: int | None = None
    max_waves: int = 64  # cap on agent steps per phase (the env's max_turns should end branches first)
    strategy_params: dict[str, Any] = field(default_factory=dict)  # extra kwargs for custom strategies

    def validate(self) -> None:
        get_strategy(self.strategy)
        for name in ("m", "num_generations", "max_waves"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n", "l"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"rollout.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_context_tokens is not None and self.max_context_tokens < 2:
            raise ValueError(f"rollout.max_context_tokens must be >= 2, got {self.max_context_tokens}")

    @property
    def is_chain(self) -> bool:
        return self.strategy == "chain"

    @property
    def trees_per_prompt(self) -> int:
        return self.num_generations if self.is_chain else self.m

    @property
    def leaves_per_tree(self) -> int:
        return 1 if self.is_chain else 1 + self.n * self.l

    @property
    def group_size(self) -> int:
        """Trajectories per prompt (G)."""
        return self.trees_per_prompt * self.leaves_per_tree

    def strategy_kwargs(self) -> dict[str, Any]:
        base: dict[str, Any] = {
            "depth": self.fixed_depth,
            "temperature": self.entropy_temperature,
            "by": self.entropy_by,
            "include_root": self.include_root,
        }
        base.update(self.strategy_params)
        return base


@dataclass
class RolloutResult:
    forests: list[Forest]
    budget: dict[str, int]  # the whole batch
    per_prompt: list[dict[str, int]] = field(default_factory=list)  # one per forest, same order


@dataclass
class _Branch:
    """A branch being run forward: where it is in which tree, and its full context."""

    forest: int
    tree: Tree
    node: int
    context: list[int]
    state: Any


def _run_waves(
    branches: list[_Branch],
    policy: Policy,
    env: Environment,
    cfg: RolloutConfig,
    counters: list[dict[str, int]],
) -> int:
    """Advance all branches to a leaf, one batched step per wave. Returns the number of waves."""
    limit = cfg.max_context_tokens
    stop = env_stop_strings(env)
    active = branches
    waves = 0
    while active:
        if waves >= cfg.max_waves:
            for b in active:  # safety cap: end each branch at the node it last created
                node = b.tree.nodes[b.node]
                node.is_leaf, node.action = True, ActionKind.TRUNCATED
                node.reward = float(env.reward(b.state))
            break
        contexts = [b.context for b in active]
        samples = policy.generate(contexts) if stop is None else policy.generate(contexts, stop=stop)
        waves += 1
        if len(samples) != len(active):
            raise ValueError(f"policy.generate returned {len(samples)} steps for {len(active)} contexts")
        for f in {b.forest for b in active}:
            counters[f]["policy_calls"] += 1
        stepping: list[tuple[_Branch, Any]] = []
        for b, s in zip(active, samples, strict=True):
            if len(s.logprobs) != len(s.token_ids):
                raise ValueError(f"step has {len(s.token_ids)} token ids but {len(s.logprobs)} logprobs")
            counters[b.forest]["prefill_tokens_reported"] += int(s.prefill_tokens)
            if limit is not None and len(b.context) + len(s.token_ids) > limit:
                keep = limit - len(b.context)
                b.tree.add_child(
                    b.node,
                    token_ids=list(s.token_ids[:keep]),
                    logprobs=list(s.logprobs[:keep]),
                    action=ActionKind.TRUNCATED,
                    text=s.text,
                    mean_entropy=_mean(s.entropies[:keep]),
                    is_leaf=True,
                    reward=float(env.reward(b.state)),
                    state=b.state,
                )
            else:
                stepping.append((b, s))
        if not stepping:
            active = []
            continue
        results = env.step([b.state for b, _ in stepping], [s.text for _, s in stepping])
        if len(results) != len(stepping):
            raise ValueError(f"env.step returned {len(results)} results for {len(stepping)} actions")
        still: list[_Branch] = []
        for (b, s), r in zip(stepping, results, strict=True):
            c = counters[b.forest]
            c["tool_calls"] += int(r.tool_calls)
            c["tool_failures"] += int(r.tool_failures)
            obs_ids = policy.encode_observation(r.observation) if r.observation else []
            ids = list(s.token_ids)
            done, action = bool(r.done), r.action
            if not done and limit is not None and len(b.context) + len(ids) + len(obs_ids) >= limit:
                obs_ids = obs_ids[: limit - len(b.context) - len(ids)]
                done, action = True, ActionKind.TRUNCATED
            node = b.tree.add_child(
                b.node,
                token_ids=ids,
                logprobs=list(s.logprobs),
                obs_ids=list(obs_ids),
                action=action,
                text=s.text,
                observation=r.observation,
                mean_entropy=_mean(s.entropies),
                is_leaf=done,
                state=r.state,
            )
            if done:
                node.reward = float(env.reward(r.state))
            else:
                b.node, b.state = node.id, r.state
                b.context.extend(ids)
                b.context.extend(obs_ids)
                still.append(b)
        active = still
    return waves


def _mean(xs: Sequence[float]) -> float:
    return float(math.fsum(xs) / len(xs)) if len(xs) else 0.0


def sample_forests(
    rows: Sequence[Mapping[str, Any]],
    group_ids: Sequence[str],
    policy: Policy,
    env: Environment,
    config: RolloutConfig | None = None,
    rng: np.random.Generator | int | None = None,
) -> RolloutResult:
    """Sample one forest per row. `group_ids` (unique) name the prompts; `rng` seeds the strategy."""
    cfg = config or RolloutConfig()
    cfg.validate()
    if len(rows) != len(group_ids):
        raise ValueError(f"got {len(rows)} rows but {len(group_ids)} group ids")
    if len(set(group_ids)) != len(group_ids):
        raise ValueError("group ids must be unique within a batch (one forest per prompt)")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    strategy = get_strategy(cfg.strategy)
    kwargs = cfg.strategy_kwargs()

    forests: list[Forest] = []
    counters: list[dict[str, int]] = []
    branches: list[_Branch] = []
    for i, (row, gid) in enumerate(zip(rows, group_ids, strict=True)):
        state, prompt = env.start(row)
        prompt_ids = list(policy.encode_prompt(prompt))
        if not prompt_ids:
            raise ValueError(f"row {i} ({gid}): empty prompt")
        if cfg.max_context_tokens is not None and len(prompt_ids) >= cfg.max_context_tokens:
            raise PromptTooLongError(
                f"row {i} ({gid}): prompt has {len(prompt_ids)} tokens, "
                f"not below rollout.max_context_tokens={cfg.max_context_tokens}"
            )
        trees = [Tree.new(str(gid), k, prompt_ids, state=state) for k in range(cfg.trees_per_prompt)]
        forests.append(Forest(str(gid), trees))
        counters.append(dict.fromkeys(SAMPLER_KEYS, 0))
        branches.extend(_Branch(i, t, 0, list(prompt_ids), state) for t in trees)

    waves = _run_waves(branches, policy, env, cfg, counters)
    iterations = 0 if cfg.is_chain else cfg.l
    for _ in range(iterations):
        branches = []
        for fi, forest in enumerate(forests):
            for t in forest.trees:
                for nid in strategy(t, cfg.n, gen, **kwargs):
                    if not 0 <= nid < len(t.nodes) or t.nodes[nid].is_leaf:
                        raise ValueError(
                            f"strategy {cfg.strategy!r} chose node {nid}, not an expansion candidate"
                        )
                    node = t.nodes[nid]
                    branches.append(_Branch(fi, t, nid, t.context_ids(nid), node.state))
        waves += _run_waves(branches, policy, env, cfg, counters)

    per_prompt = [forest_budget(f, c) for f, c in zip(forests, counters, strict=True)]
    return RolloutResult(forests, batch_budget(per_prompt, policy_calls=waves), per_prompt)


def continue_from(
    starts: Sequence[tuple[Sequence[int], Any]],
    policy: Policy,
    env: Environment,
    config: RolloutConfig | None = None,
) -> tuple[list[float], int]:
    """Run one fresh branch from each (context ids, environment state) to a leaf, all batched.

    Returns the final reward of each branch and the tokens generated in all. Used for Monte-Carlo
    node values (`treegrpo.credit`): a node's state is an immutable value, so continuing from it is
    just stepping it again, exactly as an expansion does.
    """
    cfg = config or RolloutConfig()
    trees = [Tree.new("continue", i, list(ctx), state=st) for i, (ctx, st) in enumerate(starts)]
    branches = [_Branch(0, t, 0, list(ctx), st) for t, (ctx, st) in zip(trees, starts, strict=True)]
    _run_waves(branches, policy, env, cfg, [dict.fromkeys(SAMPLER_KEYS, 0)])
    rewards, tokens = [], 0
    for t in trees:
        leaf = t.leaves()[-1]
        rewards.append(float(leaf.reward) if leaf.reward is not None else 0.0)
        tokens += sum(len(n.token_ids) for n in t.nodes[1:])
    return rewards, tokens
