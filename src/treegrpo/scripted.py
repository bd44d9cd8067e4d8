"""A deterministic scripted policy and environment: the protocols with no model and no tools.

Used by tests and the budget benchmark. Steps and observations have fixed (or seeded) token
lengths, so token accounting can be checked by hand; rewards are a seeded hash of the whole path,
so siblings differ and advantages are non-trivial. Episode states are frozen dataclasses: stepping
never mutates its input, exactly the contract branching relies on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from treegrpo.protocols import Prompt, StepResult, StepSample
from treegrpo.tree import ActionKind

RESERVED_IDS = 16  # ids below this are never sampled (room for special tokens)
REWARD_LEVELS = (0.0, 0.1, 0.2, 0.8, 1.0)  # the Search-R1 reward values (SPEC §4)


def _unit(*parts: object) -> float:
    """A reproducible uniform number in [0, 1) from arbitrary values (stable across processes)."""
    h = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


def _word_id(word: str, vocab_size: int) -> int:
    h = hashlib.blake2b(word.encode(), digest_size=4).digest()
    return RESERVED_IDS + int.from_bytes(h, "little") % (vocab_size - RESERVED_IDS)


@dataclass
class ScriptedPolicy:
    """Samples steps of random token ids; one whitespace word per id, so text ↔ ids is 1:1.

    `step_tokens` is a fixed length or an inclusive (min, max) range. Each step draws its own
    entropy level, so `mean_entropy` varies across nodes. Records every `generate` call.
    """

    step_tokens: int | tuple[int, int] = 100
    vocab_size: int = 1000
    seed: int = 0
    max_entropy: float = 3.0
    calls: list[int] = field(default_factory=list)  # batch size of each generate call
    generated_tokens: int = 0
    context_tokens: int = 0  # sum of context lengths over all generated sequences

    def __post_init__(self) -> None:
        if self.vocab_size <= RESERVED_IDS:
            raise ValueError(f"vocab_size must exceed {RESERVED_IDS}, got {self.vocab_size}")
        lo, hi = self._range()
        if not 1 <= lo <= hi:
            raise ValueError(f"step_tokens must be >= 1 (and min <= max), got {self.step_tokens}")
        self._rng = np.random.default_rng(self.seed)

    def _range(self) -> tuple[int, int]:
        if isinstance(self.step_tokens, int):
            return self.step_tokens, self.step_tokens
        lo, hi = self.step_tokens
        return int(lo), int(hi)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if all(isinstance(x, int) for x in prompt):
            return [int(x) for x in prompt]  # type: ignore[arg-type]
        text = " ".join(str(m["content"]) for m in prompt)  # type: ignore[index]
        return self.encode_observation(text)

    def encode_observation(self, text: str) -> list[int]:
        return [_word_id(w, self.vocab_size) for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(f"w{i}" for i in ids)

    def generate(self, contexts: Sequence[Sequence[int]]) -> list[StepSample]:
        self.calls.append(len(contexts))
        lo, hi = self._range()
        out: list[StepSample] = []
        for ctx in contexts:
            n = int(self._rng.integers(lo, hi + 1))
            ids = self._rng.integers(RESERVED_IDS, self.vocab_size, size=n).tolist()
            level = float(self._rng.uniform(0.0, self.max_entropy))
            ent = (level * self._rng.uniform(0.5, 1.5, size=n)).tolist()
            lps = (-self._rng.uniform(0.0, 2.0 * level + 1e-3, size=n)).tolist()
            out.append(StepSample(ids, lps, self.decode(ids), ent, prefill_tokens=len(ctx)))
            self.generated_tokens += n
            self.context_tokens += len(ctx)
        return out


@dataclass(frozen=True)
class ScriptedState:
    """Immutable episode state: the row, the number of steps taken and a digest of the path."""

    row_id: str
    turn: int = 0
    digest: str = ""
    done: bool = False


@dataclass
class ScriptedEnv:
    """`steps` agent steps per trajectory: searches with `obs_tokens`-word observations, then an answer.

    With `answer_prob` > 0 a step may answer early (seeded by the path) and the last allowed step is
    a forced final; `fail_prob` makes some tool calls fail (reported in the observation, counted).
    Reward: one of the Search-R1 levels, picked by a seeded hash of the full path.
    """

    steps: int = 3
    obs_tokens: int = 50
    prompt_tokens: int = 200
    answer_prob: float = 0.0
    fail_prob: float = 0.0
    seed: int = 0
    vocab_size: int = 1000

    def __post_init__(self) -> None:
        if self.steps < 1 or self.obs_tokens < 0 or self.prompt_tokens < 1:
            raise ValueError(
                f"ScriptedEnv needs steps >= 1, obs_tokens >= 0, prompt_tokens >= 1; got "
                f"{self.steps}, {self.obs_tokens}, {self.prompt_tokens}"
            )

    def start(self, row: Mapping[str, Any]) -> tuple[ScriptedState, Prompt]:
        if "id" not in row:
            raise ValueError(f"scripted row needs an 'id' field, got keys {sorted(row)}")
        rid = str(row["id"])
        prompt = [_word_id(f"p{self.seed}:{rid}:{k}", self.vocab_size) for k in range(self.prompt_tokens)]
        return ScriptedState(rid, 0, f"{self.seed}:{rid}"), prompt

    def step(self, states: Sequence[Any], actions: Sequence[str]) -> list[StepResult]:
        if len(states) != len(actions):
            raise ValueError(f"step got {len(states)} states but {len(actions)} actions")
        out: list[StepResult] = []
        for st, act in zip(states, actions, strict=True):
            if st.done:
                raise ValueError(f"row {st.row_id}: step() on a finished episode")
            digest = hashlib.blake2b(f"{st.digest}|{act}".encode(), digest_size=8).hexdigest()
            turn = st.turn + 1
            if turn >= self.steps:
                kind = ActionKind.FORCED_FINAL if self.answer_prob > 0 else ActionKind.ANSWER
                out.append(StepResult(replace(st, turn=turn, digest=digest, done=True), "", True, kind))
            elif self.answer_prob > 0 and _unit(self.seed, digest, "answer") < self.answer_prob:
                new = replace(st, turn=turn, digest=digest, done=True)
                out.append(StepResult(new, "", True, ActionKind.ANSWER))
            else:
                failed = self.fail_prob > 0 and _unit(self.seed, digest, "fail") < self.fail_prob
                head = "error" if failed else "info"
                words = [head] + [f"o{digest[:4]}{k}" for k in range(self.obs_tokens - 1)]
                obs = " ".join(words[: self.obs_tokens])
                new = replace(st, turn=turn, digest=digest)
                out.append(StepResult(new, obs, False, ActionKind.SEARCH, 1, int(failed)))
        return out

    def reward(self, state: Any) -> float:
        if not state.done:
            return 0.0  # no answer given (e.g. a branch the sampler truncated)
        u = _unit(self.seed, state.digest, "reward")
        return REWARD_LEVELS[min(int(u * len(REWARD_LEVELS)), len(REWARD_LEVELS) - 1)]
