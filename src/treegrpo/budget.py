"""Rollout budget accounting as pure functions over finished trees.

What a rollout cost, in the units the paper's budget comparisons use (SPEC §3): tokens generated,
tokens prefilled (with and without reusing shared prefixes), observation tokens, tool calls, and
what it bought (trajectories, trained tokens). Everything derivable from the trees is computed from
the trees; only counts the trees cannot know (generate waves, tool calls and failures, what the
backend itself reported as prefill) come from the sampler and are merged in.

Prefix-reuse model (idealized prefix cache, no eviction): a prompt is prefilled once per forest
(all its trees share it); a step's generated ids are in the cache once generated; a node's
observation ids are prefilled once, when its first child is generated. So a shared prefix is never
prefilled twice, while `prefill_tokens_no_reuse` re-reads the full context on every generated step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from treegrpo.tree import Forest, Tree

# Counts the sampler adds per prompt (not derivable from the trees).
SAMPLER_KEYS = ("policy_calls", "tool_calls", "tool_failures", "prefill_tokens_reported")

TREE_KEYS = (
    "generated_tokens",  # tokens the policy generated (each unique node once)
    "observation_tokens",  # environment tokens appended after steps
    "sequences_generated",  # agent steps sampled = non-root nodes
    "prefill_tokens_no_reuse",  # sum of the full context length of every generated step
    "observation_prefill",  # observation ids that a later step had to prefill (once per node)
    "trajectories",  # leaves
    "trained_tokens_unique",  # tokens of the tree, each once (prefix-shared training)
    "trained_tokens_total",  # sum over leaves of the root→leaf path length (one sequence per leaf)
    "loss_tokens_unique",  # generated (loss-masked) tokens, each once
    "loss_tokens_total",  # generated tokens summed over leaf paths
)


def tree_budget(tree: Tree) -> dict[str, int]:
    """Token counts of one tree (no prompt prefill: prompts are shared per forest)."""
    n = len(tree.nodes)
    ctx = [0] * n  # context length after node i: prompt + steps + observations down to i
    gen = [0] * n  # generated tokens on the path down to i
    out = dict.fromkeys(TREE_KEYS, 0)
    for node in tree.nodes:  # parents precede children
        size = len(node.token_ids) + len(node.obs_ids)
        out["trained_tokens_unique"] += size
        if node.parent is None:
            ctx[node.id] = size
            continue
        p = node.parent
        out["generated_tokens"] += len(node.token_ids)
        out["loss_tokens_unique"] += len(node.token_ids)
        out["observation_tokens"] += len(node.obs_ids)
        out["sequences_generated"] += 1
        out["prefill_tokens_no_reuse"] += ctx[p]
        ctx[node.id] = ctx[p] + size
        gen[node.id] = gen[p] + len(node.token_ids)
        if node.children:
            out["observation_prefill"] += len(node.obs_ids)
        if node.is_leaf:
            out["trajectories"] += 1
            out["trained_tokens_total"] += ctx[node.id]
            out["loss_tokens_total"] += gen[node.id]
    return out


def forest_budget(forest: Forest, counters: Mapping[str, int] | None = None) -> dict[str, int]:
    """Budget of one prompt: tree counts summed, prompt prefilled once, sampler counters merged."""
    out = dict.fromkeys(TREE_KEYS, 0)
    for t in forest.trees:
        for k, v in tree_budget(t).items():
            out[k] += v
    prompts = {tuple(t.prompt_ids) for t in forest.trees if t.root.children}
    out["prefill_tokens"] = sum(len(p) for p in prompts) + out["observation_prefill"]
    out["trees"] = len(forest.trees)
    for k in SAMPLER_KEYS:
        out[k] = int(counters.get(k, 0)) if counters else 0
    return out


def batch_budget(per_prompt: Iterable[Mapping[str, int]], policy_calls: int | None = None) -> dict[str, int]:
    """Sum per-prompt budgets; `policy_calls` is the batch's generate-call count (waves are shared
    across prompts, so summing the per-prompt wave counts would overcount)."""
    out: dict[str, int] = {}
    prompts = 0
    for b in per_prompt:
        prompts += 1
        for k, v in b.items():
            out[k] = out.get(k, 0) + int(v)
    out["prompts"] = prompts
    if policy_calls is not None:
        out["policy_calls"] = policy_calls
    return out


def forests_budget(forests: Iterable[Forest]) -> dict[str, int]:
    """Batch budget from trees alone (e.g. read back from JSON lines): sampler counters are 0."""
    return batch_budget(forest_budget(f) for f in forests)
