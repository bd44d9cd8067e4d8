"""A plug-in environment of one's own: arithmetic with a calculator tag (the README's plug-in example).

The agent writes ``<calc> 12*7 </calc>``, the environment answers ``<result>84</result>``, and the
agent ends with ``<answer> 84 </answer>``. Train it with (from the repository root)::

    PYTHONPATH=examples treegrpo train --config examples/arith.yaml

What makes it work is ``stop_strings``: a step stops at ``</calc>`` so the model never writes a
result of its own before the real one arrives.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from treegrpo.protocols import StepResult
from treegrpo.tools.calculator import CalculatorError, calculator
from treegrpo.tree import ActionKind

INSTRUCTION = (
    "Solve the problem. Compute with <calc> expression </calc>; the result comes back as "
    "<result> value </result>. Then give the final number as <answer> value </answer>. Problem: "
)
INVALID_OBS = (
    "\n<result> invalid action: use <calc> expression </calc> or <answer> value </answer> </result>\n"
)
_ACTION = re.compile(r"<(calc|answer)>(.*?)</\1>", re.DOTALL)


@dataclass(frozen=True)
class ArithState:
    question: str
    answer: str
    turns: int = 0
    final: str | None = None


class ArithEnv:
    """start / step / reward, plus the tags that end a step."""

    stop_strings = ("</calc>", "</answer>")

    def __init__(self, max_turns: int = 3, **_: Any) -> None:  # ignores retriever/tokenizer it is offered
        self.max_turns = int(max_turns)

    def start(self, row: Mapping[str, Any]) -> tuple[ArithState, list[dict[str, str]]]:
        question, gold = str(row["question"]), str(row["golden_answers"][0])
        return ArithState(question, gold), [{"role": "user", "content": INSTRUCTION + question}]

    def step(self, states: Sequence[ArithState], actions: Sequence[str]) -> list[StepResult]:
        out = []
        for state, text in zip(states, actions, strict=True):
            m = _ACTION.search(text)
            last_turn = state.turns + 1 >= self.max_turns
            if m and m.group(1) == "answer":
                out.append(StepResult(replace(state, final=m.group(2).strip()), "", True, ActionKind.ANSWER))
            elif last_turn:
                out.append(StepResult(state, "", True, ActionKind.FORCED_FINAL))
            elif m:
                try:
                    obs = f"\n<result> {calculator(m.group(2))} </result>\n"
                    failed = 0
                except CalculatorError as e:
                    obs, failed = f"\n<result> error: {e} </result>\n", 1
                new = replace(state, turns=state.turns + 1)
                out.append(StepResult(new, obs, False, ActionKind.SEARCH, tool_calls=1, tool_failures=failed))
            else:
                out.append(
                    StepResult(replace(state, turns=state.turns + 1), INVALID_OBS, False, ActionKind.INVALID)
                )
        return out

    def reward(self, state: ArithState) -> float:
        return float(state.final is not None and state.final == state.answer)

    def tokenizer_texts(self) -> list[str]:
        """Texts the tiny model's tokenizer must cover beyond the data and demonstrations."""
        return [INSTRUCTION, INVALID_OBS, "<calc> </calc> <result> </result> <answer> </answer> error"]
