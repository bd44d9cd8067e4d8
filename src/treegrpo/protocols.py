"""The two small interfaces the tree sampler drives: a policy and an environment.

Both are structural (`typing.Protocol`): anything with these methods works, including the scripted
fakes used in tests. The sampler owns the tree; the environment owns episode state, which is an
immutable value, so branching from the middle of a trajectory is just reusing a node's state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from treegrpo.tree import ActionKind

# A prompt is either chat messages ([{"role": ..., "content": ...}]) or already token ids.
Prompt = list[dict[str, str]] | list[int]


@dataclass
class StepSample:
    """One generated agent step, token ids out."""

    token_ids: list[int]
    logprobs: list[float]
    text: str  # decoding of token_ids: what the environment parses
    entropies: list[float] = field(default_factory=list)
    prefill_tokens: int = 0  # context tokens this backend actually ran a forward over for this step


def triage_contexts(
    contexts: Sequence[Sequence[int]], max_context: int, vocab_size: int | None = None
) -> tuple[list[StepSample | None], list[int]]:
    """The checks every backend's `generate` makes before sampling, in one place.

    Empty contexts and (when `vocab_size` is given) ids outside the vocabulary raise ValueError; a
    context that already fills `max_context` gets an empty step (the sampler ends that branch).
    Returns the output slots (pre-filled for full contexts) and the indices still to generate.
    """
    out: list[StepSample | None] = [None] * len(contexts)
    work: list[int] = []
    for i, ctx in enumerate(contexts):
        if len(ctx) == 0:
            raise ValueError(f"context {i} is empty")
        if vocab_size is not None:
            bad = [t for t in ctx if not 0 <= int(t) < vocab_size]
            if bad:
                raise ValueError(
                    f"context {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}"
                )
        if len(ctx) >= max_context:
            out[i] = StepSample(token_ids=[], logprobs=[], text="", entropies=[], prefill_tokens=0)
        else:
            work.append(i)
    return out, work


@runtime_checkable
class Policy(Protocol):
    """Samples agent steps. One `generate` call = one batched policy call for all active branches."""

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Chat messages → prompt ids (chat template, generation prompt added); ids pass through."""
        ...

    def encode_observation(self, text: str) -> list[int]:
        """Tokenize an observation once, on its own (never re-tokenize sampled text)."""
        ...

    def generate(
        self, contexts: Sequence[Sequence[int]], stop: Sequence[str] | None = None
    ) -> list[StepSample]:
        """Continue each context by one agent step, stopping at an action end tag.

        `stop`: the environment's action end tags for this call (None: the policy's own). The sampler
        passes it only when the environment declares `stop_strings`, so a policy that never meets such
        an environment may leave the parameter out.
        """
        ...


@dataclass
class StepResult:
    """What the environment answers to one agent step."""

    state: Any  # the new (immutable) episode state after this step
    observation: str  # text appended after the step ("" for a final step)
    done: bool  # the branch is finished: this node is a leaf
    action: ActionKind
    tool_calls: int = 0  # tool invocations this step made (0 or 1 for Search-R1)
    tool_failures: int = 0  # of which failed (reported as an observation, never raised)


@runtime_checkable
class Environment(Protocol):
    """A multi-turn tool environment. Episode states must be values: `step` never mutates its input.

    These three methods are the whole contract. Optional attributes, each with a default:

    - ``stop_strings``: a sequence of strings that end an agent step (default: the policy's own,
      Search-R1's ``</search>``, ``</answer>``); a step stops at the first of them, keeping the whole
      token the string ends in. ``()`` means "only the end-of-turn token ends a step".
    - ``tokenizer_texts()``: extra texts (observations, tags) a tokenizer trained for this environment
      must cover; ``tokenizer_tokens()``: strings it keeps whole, one token each (e.g. tags).
    """

    def start(self, row: Mapping[str, Any]) -> tuple[Any, Prompt]:
        """Begin an episode from one dataset row: (initial state, prompt)."""
        ...

    def step(self, states: Sequence[Any], actions: Sequence[str]) -> list[StepResult]:
        """Advance many episodes by one agent step each (batched, so tool calls can be batched)."""
        ...

    def reward(self, state: Any) -> float:
        """Outcome reward of a finished trajectory."""
        ...


def env_stop_strings(env: Any) -> tuple[str, ...] | None:
    """The environment's declared `stop_strings` (None when it declares none); bad values raise ValueError."""
    stops = getattr(env, "stop_strings", None)
    if stops is None:
        return None
    if isinstance(stops, str) or not isinstance(stops, Sequence):
        raise ValueError(f"env.stop_strings must be a sequence of strings, got {type(stops).__name__}")
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"env.stop_strings must be non-empty strings, got {list(stops)!r}")
    return tuple(stops)


def question_messages(template: str, question: str, system_prompt: str = "") -> list[dict[str, str]]:
    """Chat messages asking `question` through `template` (its `{question}`), after an optional system turn.

    `str.replace`, not `format`: a template may hold other braces (JSON examples of a tool call, etc.).
    """
    messages: list[dict[str, str]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": template.replace("{question}", question)})
    return messages
