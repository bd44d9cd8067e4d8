"""Plug-ins for the reliability tests, loaded by import path from a config (tests/ is on sys.path).

- ``switchable_reward``: the built-in ``em_format`` reward, unless ``TREEGRPO_TEST_REWARD`` holds a
  float literal (``nan``, ``inf``, ``0.5`` ...), which is then returned for every trajectory. One
  config (so one warm-start cache entry) serves healthy, constant and non-finite reward runs.
- ``SearchEveryStep``: the Search-R1 environment, except that a step which is neither a search nor an
  answer searches for its own text. A tiny untrained model rarely writes a well-formed ``<search>``;
  this makes it hit the retriever at every step, so a retriever outage is exercised in a short run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from treegrpo.envs.parsing import parse_step
from treegrpo.envs.search_r1 import SearchR1Env, SearchState
from treegrpo.protocols import StepResult
from treegrpo.rewards import em_format_score

REWARD_ENV = "TREEGRPO_TEST_REWARD"


def switchable_reward(response: str, golden_answers: list[str]) -> float:
    forced = os.environ.get(REWARD_ENV, "")
    if forced:
        return float(forced)
    return em_format_score(response, golden_answers)


class SearchEveryStep(SearchR1Env):
    """Turn every invalid step into a search for (the start of) its text."""

    def step(self, states: Sequence[SearchState], actions: Sequence[str]) -> list[StepResult]:
        forced = [
            a if parse_step(a).kind != "invalid" else f"<search>{a[:80]}</search>"
            for a in (x if isinstance(x, str) else "" for x in actions)
        ]
        return super().step(states, forced)
