"""A scripted choice task whose step advantages are known in closed form (tests, quick benchmark).

Each step the policy picks "good" or "bad"; P(good) at step depth d is `p_good[d]`. The reward is
additive, R = Σ_d weights[d]·[step d was good], so V(after a prefix) = Σ_{done} w_d·[good_d] +
Σ_{to do} w_d·p_d and the true advantage of a step at depth d is A* = w_d·([good] − p_d). A weight of 0
makes a depth a non-decision (A* = 0 exactly): credit spent there is wasted. States are frozen values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from treegrpo.protocols import Prompt, StepResult, StepSample
from treegrpo.tree import ActionKind

GOOD, BAD, OBS = 1, 2, 3  # token ids of the two actions and of the observation
WORDS = {GOOD: "good", BAD: "bad", OBS: "obs"}


@dataclass(frozen=True)
class ChoiceState:
    choices: tuple[bool, ...] = ()
    done: bool = False


@dataclass
class ChoicePolicy:
    """Picks good with probability p_good[d] at step depth d (read off the context), seeded."""

    p_good: Sequence[float]
    seed: int = 0
    step_tokens: int = 1  # a step repeats its action id this many times (to vary token counts)

    def __post_init__(self) -> None:
        if not self.p_good or not all(0.0 <= p <= 1.0 for p in self.p_good):
            raise ValueError(f"p_good must be probabilities, got {self.p_good}")
        self._rng = np.random.default_rng(self.seed)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return [int(x) for x in prompt]  # type: ignore[arg-type]

    def encode_observation(self, text: str) -> list[int]:
        return [OBS] if text else []

    def generate(self, contexts: Sequence[Sequence[int]]) -> list[StepSample]:
        out = []
        for ctx in contexts:
            d = sum(1 for t in ctx if t == OBS)
            p = float(self.p_good[min(d, len(self.p_good) - 1)])
            good = bool(self._rng.random() < p)
            tok = GOOD if good else BAD
            lp = math.log(p if good else 1.0 - p) if 0.0 < p < 1.0 else 0.0
            ent = -sum(q * math.log(q) for q in (p, 1.0 - p) if q > 0)
            n = self.step_tokens
            out.append(StepSample([tok] * n, [lp] * n, WORDS[tok], [ent] * n, prefill_tokens=len(ctx)))
        return out


@dataclass
class ChoiceEnv:
    """`len(weights)` steps; observation "obs" after each but the last; additive reward."""

    weights: Sequence[float] = field(default_factory=lambda: (1.0, 0.0, 1.0))

    def start(self, row: Mapping[str, Any]) -> tuple[ChoiceState, Prompt]:
        return ChoiceState(), [10 + int(row.get("id", 0)) % 1000]

    def step(self, states: Sequence[Any], actions: Sequence[str]) -> list[StepResult]:
        out = []
        for st, act in zip(states, actions, strict=True):
            choices = (*st.choices, act.strip() == "good")
            done = len(choices) >= len(self.weights)
            new = replace(st, choices=choices, done=done)
            kind = ActionKind.ANSWER if done else ActionKind.SEARCH
            out.append(StepResult(new, "" if done else "obs", done, kind, 0 if done else 1))
        return out

    def reward(self, state: Any) -> float:
        return float(sum(w for w, g in zip(self.weights, state.choices, strict=False) if g))

    def true_value(self, state: ChoiceState, p_good: Sequence[float]) -> float:
        """V(state) in closed form under a ChoicePolicy with `p_good`."""
        k = len(state.choices)
        done = sum(w for w, g in zip(self.weights, state.choices, strict=False) if g)
        return float(done + sum(self.weights[d] * p_good[d] for d in range(k, len(self.weights))))
