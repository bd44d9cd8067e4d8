"""The Search-R1 agent environment: think, search, read, answer (SPEC §2 and §4).

Episode state is a frozen value (:class:`SearchState`); ``step`` returns new states and never
touches its inputs, so the tree sampler branches from any node just by stepping that node's state
again. Tool calls of one ``step`` call — across all active branches, trees and prompts — go to the
retriever as ONE batched search.

Turn accounting (a documented choice): every step that does not end the episode (a search or an
invalid action) uses one turn, as in the reference loop; so a trajectory has at most
``max_turns + 1`` steps even if the model never emits a well-formed action. Once ``max_turns`` turns
are used, the next step is the forced final one: it always ends the branch; it is an ``ANSWER`` if it
contains one, otherwise ``FORCED_FINAL`` (a search in it is NOT executed).

Observations (a retriever failure keeps the ``<information>`` wrapper, so a tool outage is not
scored as a format error of the agent):

- search → ``"\\n\\n<information>Doc 1(Title: …) …\\nDoc 2(Title: …) …</information>\\n\\n"`` capped at
  ``max_obs_tokens`` (counted with ``tokenizer`` if given, else whitespace-separated words; the
  passages are cut, the closing tag is kept);
- answer → no observation, done;
- invalid → :data:`INVALID_ACTION_OBS`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from treegrpo.envs.parsing import parse_step
from treegrpo.protocols import Prompt, StepResult, question_messages
from treegrpo.retrievers.base import Passage, Retriever
from treegrpo.rewards import RewardFn, get_reward, is_valid_format
from treegrpo.tree import ActionKind

DEFAULT_TEMPLATE = (
    "Answer the question below. Reason inside <think> and </think> first, and again every time you "
    "receive new information. If you are missing knowledge after reasoning, call the search engine "
    "with <search> your query </search>; its top results come back between <information> and "
    "</information>. You may search as many times as you need. When no more outside knowledge is "
    "needed, give only the final answer inside <answer> and </answer>, without explanation, e.g. "
    "<answer> Beijing </answer>. Question: {question}\n"
)

# Deliberately no complete "<answer>…</answer>" pair: the observation becomes part of the response,
# and a pair here would be extracted as the agent's answer when it never gives one (0.1 instead of 0.0).
INVALID_ACTION_OBS = (
    "\nMy previous action is invalid. To search, I should put the query between <search> and "
    "</search>. To give the final answer, I should put it inside the answer tags, opening with "
    "<answer> and closing with the matching end tag. Let me try again.\n"
)

SEARCH_FAILED_BODY = "The search engine could not be reached, so no documents were retrieved."
NO_RESULTS_BODY = "No documents were found for this query."


class TextTokenizer(Protocol):
    """The part of a tokenizer the observation cap needs (Hugging Face tokenizers fit)."""

    def encode(self, text: str, **kwargs: Any) -> list[int]: ...

    def decode(self, ids: list[int], **kwargs: Any) -> str: ...


@dataclass(frozen=True)
class SearchState:
    """One episode, as a value. ``response`` is everything after the prompt (steps + observations)."""

    question: str
    golden_answers: tuple[str, ...]
    turns: int = 0  # steps that did not end the episode (searches + invalid actions)
    searches: int = 0  # retriever calls made
    response: str = ""
    done: bool = False


def format_passages(passages: Sequence[Passage]) -> str:
    """Search-R1's rendering: one ``Doc i(Title: …) text`` line per passage."""
    return "\n".join(f"Doc {i}(Title: {p.title}) {p.text}" for i, p in enumerate(passages, start=1))


def _wrap(body: str) -> str:
    return f"\n\n<information>{body}</information>\n\n"


class SearchR1Env:
    """Search-R1 multi-turn environment over any :class:`~treegrpo.retrievers.Retriever`."""

    def __init__(
        self,
        retriever: Retriever,
        max_turns: int = 4,
        topk: int = 3,
        max_obs_tokens: int = 256,
        reward_fn: str | RewardFn = "em_format",
        tokenizer: TextTokenizer | None = None,
        system_prompt: str | None = None,
        template: str | None = None,
    ) -> None:
        if max_turns < 0:
            raise ValueError(f"max_turns must be >= 0, got {max_turns}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if max_obs_tokens < 1:
            raise ValueError(f"max_obs_tokens must be >= 1, got {max_obs_tokens}")
        template = DEFAULT_TEMPLATE if template is None else template
        if "{question}" not in template:
            raise ValueError("template must contain the placeholder {question}")
        self.retriever = retriever
        self.max_turns = int(max_turns)
        self.topk = int(topk)
        self.max_obs_tokens = int(max_obs_tokens)
        self.reward_fn: RewardFn = get_reward(reward_fn)
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.template = template

    # ---- episode start ---------------------------------------------------------------------
    def build_prompt(self, question: str) -> list[dict[str, str]]:
        """Chat messages for a question; the policy's chat template turns them into ids."""
        return question_messages(self.template, question, self.system_prompt)

    def start(self, row: Mapping[str, Any]) -> tuple[SearchState, Prompt]:
        """Begin an episode from a normalized row (see :mod:`treegrpo.data`)."""
        if not isinstance(row, Mapping):
            raise ValueError(f"row must be a mapping, got {type(row).__name__}")
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"row {row.get('group_id', '?')}: 'question' must be a non-empty string")
        golds = row.get("golden_answers", [])
        if isinstance(golds, str):
            golds = [golds]
        if not isinstance(golds, Sequence) or not all(isinstance(g, str) for g in golds):
            raise ValueError(f"row {row.get('group_id', '?')}: 'golden_answers' must be a list of strings")
        state = SearchState(question=question.strip(), golden_answers=tuple(golds))
        prompt = row.get("prompt")
        if prompt is not None:
            if not (isinstance(prompt, list) and prompt and all(isinstance(m, Mapping) for m in prompt)):
                raise ValueError(f"row {row.get('group_id', '?')}: 'prompt' must be a list of chat messages")
            return state, [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
        return state, self.build_prompt(state.question)

    # ---- one step for many branches -----------------------------------------------------------
    def step(self, states: Sequence[SearchState], actions: Sequence[str]) -> list[StepResult]:
        """Advance each episode by the step its policy generated; searches run as one batch."""
        if len(states) != len(actions):
            raise ValueError(f"step got {len(states)} states but {len(actions)} actions")
        results: list[StepResult | None] = [None] * len(states)
        pending: list[tuple[int, str]] = []  # (position, query) of searches to run
        for i, (state, action) in enumerate(zip(states, actions, strict=True)):
            if not isinstance(state, SearchState):
                raise ValueError(f"states[{i}] is a {type(state).__name__}, not a SearchState")
            if state.done:
                raise ValueError(f"states[{i}] is finished; a leaf cannot take another step")
            text = action if isinstance(action, str) else ""
            parsed = parse_step(text)
            response = state.response + text
            if state.turns >= self.max_turns:  # the forced final step
                kind = ActionKind.ANSWER if parsed.kind == "answer" else ActionKind.FORCED_FINAL
                results[i] = StepResult(replace(state, response=response, done=True), "", True, kind)
            elif parsed.kind == "answer":
                done_state = replace(state, response=response, done=True)
                results[i] = StepResult(done_state, "", True, ActionKind.ANSWER)
            elif parsed.kind == "invalid":
                obs = INVALID_ACTION_OBS
                new = replace(state, response=response + obs, turns=state.turns + 1)
                results[i] = StepResult(new, obs, False, ActionKind.INVALID)
            else:
                pending.append((i, parsed.content))
        if pending:
            hits, failed = self._search([q for _, q in pending])
            for (i, _), passages in zip(pending, hits, strict=True):
                state, text = states[i], actions[i] if isinstance(actions[i], str) else ""
                obs = self.render_observation(passages, failed)
                new = replace(
                    state,
                    response=state.response + text + obs,
                    turns=state.turns + 1,
                    searches=state.searches + 1,
                )
                results[i] = StepResult(
                    new, obs, False, ActionKind.SEARCH, tool_calls=1, tool_failures=int(failed)
                )
        return [r for r in results if r is not None]

    def _search(self, queries: list[str]) -> tuple[list[list[Passage]], bool]:
        """One batched retriever call; any failure (or a mis-shaped answer) → (empty hits, True)."""
        try:
            hits = self.retriever.search(queries, self.topk)
            if not isinstance(hits, list) or len(hits) != len(queries):
                raise ValueError("retriever returned the wrong number of result lists")
            return [list(h)[: self.topk] for h in hits], False
        except Exception:  # a tool outage is an observation, never an exception (issue 4)
            return [[] for _ in queries], True

    # ---- observation rendering --------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        """Works for transformers tokenizers and raw ``tokenizers.Tokenizer`` (returns an Encoding)."""
        assert self.tokenizer is not None
        try:
            out: Any = self.tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            out = self.tokenizer.encode(text)
        return list(getattr(out, "ids", out))

    def _count(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self._encode(text))
        return len(text.split())

    def _truncate(self, body: str, budget: int) -> str:
        if budget <= 0:
            return ""
        if self.tokenizer is not None:
            ids = self._encode(body)
            if len(ids) <= budget:
                return body
            return self.tokenizer.decode(ids[:budget], skip_special_tokens=True)
        words = list(re.finditer(r"\S+", body))
        if len(words) <= budget:
            return body
        return body[: words[budget - 1].end()]

    def render_observation(self, passages: Sequence[Passage], failed: bool = False) -> str:
        """The ``<information>`` block for one search, at most ``max_obs_tokens`` long."""
        if failed:
            body = SEARCH_FAILED_BODY
        elif not passages:
            body = NO_RESULTS_BODY
        else:
            body = format_passages(passages)
        obs = _wrap(body)
        over = self._count(obs) - self.max_obs_tokens
        if over <= 0:
            return obs
        budget = max(0, self._count(body) - over)
        for _ in range(8):  # token merges at the cut can shift counts by a few: shrink until it fits
            obs = _wrap(self._truncate(body, budget))
            over = self._count(obs) - self.max_obs_tokens
            if over <= 0 or budget == 0:
                return obs
            budget = max(0, budget - over)
        return _wrap("")

    # ---- outcome ----------------------------------------------------------------------------
    def reward(self, state: SearchState) -> float:
        """The configured reward of the trajectory's response against the gold answers."""
        return float(self.reward_fn(state.response, list(state.golden_answers)))

    def format_valid(self, response: str) -> bool:
        """SPEC §4's tag format: the training diagnostics report the share of responses that pass it."""
        return is_valid_format(response)


__all__ = [
    "DEFAULT_TEMPLATE",
    "INVALID_ACTION_OBS",
    "NO_RESULTS_BODY",
    "SEARCH_FAILED_BODY",
    "SearchR1Env",
    "SearchState",
    "format_passages",
]
