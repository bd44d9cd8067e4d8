"""A tiny model trained a few Tree-GRPO steps on a trivially learnable task increases its mean reward."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from treegrpo.build import RunParts
from treegrpo.config import load_config
from treegrpo.models import tiny_causal_lm
from treegrpo.protocols import StepResult
from treegrpo.tokenizer import train_tokenizer
from treegrpo.tree import ActionKind

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime"]


@dataclass(frozen=True)
class _State:
    steps: int = 0
    said_apple: bool = False


class AppleEnv:
    """Two agent steps; reward 1 if the final step mentions 'apple', else 0 (learnable by sampling)."""

    def start(self, row: Mapping[str, Any]) -> tuple[_State, list[dict[str, str]]]:
        return _State(), [{"role": "user", "content": "name a fruit"}]

    def step(self, states: Sequence[_State], actions: Sequence[str]) -> list[StepResult]:
        out = []
        for s, a in zip(states, actions, strict=True):
            ns = replace(s, steps=s.steps + 1, said_apple="apple" in a)
            done = ns.steps >= 2
            out.append(
                StepResult(
                    state=ns,
                    observation="" if done else " ok ",
                    done=done,
                    action=ActionKind.ANSWER if done else ActionKind.SEARCH,
                )
            )
        return out

    def reward(self, state: _State) -> float:
        return 1.0 if state.said_apple else 0.0


def test_tree_grpo_increases_mean_reward(tmp_path: Path):
    from treegrpo.trainer import Trainer

    tok = train_tokenizer([" ".join(WORDS), "name a fruit ok"], kind="wordlevel")
    model = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=0)
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "policy.max_new_tokens=3",
            "trainer.prompts_per_step=8",
            "trainer.lr=0.02",
            "trainer.beta=0.0",
            "trainer.entropy_coeff=0.0",
            "trainer.eval_every=0",
        ],
    )
    rows = [{"question": "q", "golden_answers": ["apple"], "group_id": f"g/{i}"} for i in range(64)]
    parts = RunParts(model=model, tokenizer=tok, env=AppleEnv(), train_rows=rows, eval_rows=[])
    trainer = Trainer(cfg, parts, tmp_path / "run")
    rewards = [trainer.train_step()["train/reward_mean"] for _ in range(12)]
    first, last = float(np.mean(rewards[:3])), float(np.mean(rewards[-3:]))
    assert last > first + 0.2, rewards


def test_on_policy_shortcut_equals_recomputed_old_logprobs(tmp_path: Path):
    """Skipping the old-log-prob forward (one update per rollout) changes nothing but the cost."""
    import copy

    import torch

    from treegrpo.trainer import Trainer

    tok = train_tokenizer([" ".join(WORDS), "name a fruit ok"], kind="wordlevel")
    cfg = load_config(
        None, [f"output_dir={tmp_path}", "policy.max_new_tokens=3", "trainer.prompts_per_step=4"]
    )
    rows = [{"question": "q", "golden_answers": ["apple"], "group_id": f"g/{i}"} for i in range(8)]
    model = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=1)
    a = Trainer(cfg, RunParts(copy.deepcopy(model), tok, AppleEnv(), rows, []), tmp_path / "a")
    b = Trainer(cfg, RunParts(copy.deepcopy(model), tok, AppleEnv(), rows, []), tmp_path / "b")
    assert a.on_policy
    b.on_policy = False
    forests, _, _ = a.rollout()
    from treegrpo.advantage import compute_advantages
    from treegrpo.tree import leaf_arrays
    from treegrpo.update import attach_advantages

    r, g, t = leaf_arrays(forests)
    per_tree = attach_advantages(forests, compute_advantages(np.asarray(r) + np.arange(len(r)) * 0.1, g, t))
    ma = a.train_on(forests, per_tree)
    mb = b.train_on(forests, per_tree)
    assert ma is not None and mb is not None
    assert abs(ma["loss"] - mb["loss"]) < 1e-6
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)
