"""Held-out evaluation: greedy decoding, one chain per question, exact match of the final answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from treegrpo.data import group_ids_of
from treegrpo.protocols import Policy
from treegrpo.rewards import exact_match, extract_answer
from treegrpo.rollout import RolloutConfig, sample_forests


def evaluate(
    policy: Policy, env: Any, rows: Sequence[dict[str, Any]], batch_size: int = 64
) -> dict[str, float]:
    """Greedy decoding, one chain per question: exact match of the last <answer> and mean reward."""
    if not rows:
        return {}
    cfg = RolloutConfig(strategy="chain", num_generations=1)
    ems: list[float] = []
    rewards: list[float] = []
    searches: list[int] = []
    for s in range(0, len(rows), batch_size):
        chunk = list(rows[s : s + batch_size])
        result = sample_forests(chunk, group_ids_of(chunk), policy, env, cfg, np.random.default_rng(0))
        for row, forest in zip(chunk, result.forests, strict=True):
            tree = forest.trees[0]
            leaf = tree.leaves()[0]
            ems.append(exact_match(extract_answer(tree.response_text(leaf.id)), row["golden_answers"]))
            rewards.append(float(leaf.reward or 0.0))
            searches.append(sum(tree.nodes[i].action == "search" for i in tree.ancestors(leaf.id)))
    return {
        "eval/em": float(np.mean(ems)),
        "eval/reward_mean": float(np.mean(rewards)),
        "eval/searches_mean": float(np.mean(searches)),
        "eval/n": float(len(rows)),
    }
