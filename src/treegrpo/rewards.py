"""Outcome rewards for the Search-R1 agent protocol (SPEC §4).

A *response* is everything the agent produced after the prompt — its steps and the
``<information>`` observations the environment appended — as one string. The prompt is never part
of it, so the ``<answer> Beijing </answer>`` example inside the instruction cannot be scored.

``em_format_score`` is exactly the SPEC §4 table:

=================================== ======
case                                reward
=================================== ======
correct, valid format               1.0
correct, invalid format             0.8
wrong or missing answer, valid      0.2
wrong answer, invalid format        0.1
no answer, invalid format           0.0
=================================== ======

``f1_format_score`` keeps that table's shape for open-ended answers by interpolating linearly in
token F1 between the "wrong" and "correct" rows: valid format → 0.2 + 0.8·F1, invalid format with an
answer → 0.1 + 0.7·F1, no answer → 0.0 (or 0.2 if valid, which cannot happen: a valid response has an
answer). At F1 ∈ {0, 1} it equals the EM table.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable

RewardFn = Callable[[str, list[str]], float]

# SPEC §4 table.
CORRECT_VALID = 1.0
CORRECT_INVALID = 0.8
WRONG_VALID = 0.2
WRONG_INVALID = 0.1
MISSING_INVALID = 0.0

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation, drop articles, collapse whitespace."""
    s = str(s).lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _as_list(golds: str | Iterable[str]) -> list[str]:
    if isinstance(golds, str):
        return [golds]
    return [str(g) for g in golds]


def extract_answer(response: str) -> str | None:
    """The content of the LAST balanced ``<answer>…</answer>`` pair, stripped; None if there is none.

    Each ``</answer>`` is matched with the last ``<answer>`` after the previous ``</answer>``, so a
    stray closing tag never swallows an earlier answer into the content.
    """
    if not isinstance(response, str):
        return None
    found: str | None = None
    start = 0  # search window for the opening tag: after the previous close tag
    pos = 0
    while True:
        close = response.find("</answer>", pos)
        if close < 0:
            return found
        open_ = response.rfind("<answer>", start, close)
        if open_ >= 0:
            found = response[open_ + len("<answer>") : close].strip()
        pos = start = close + len("</answer>")


_TAG_RE = re.compile(r"</?(?:think|search|information|answer)>")

# Format state machine: state -> {tag -> next state}. "in_X" states consume free text.
_TRANSITIONS: dict[str, dict[str, str]] = {
    "start": {"<think>": "in_think"},
    "in_think": {"</think>": "after_think"},
    "after_think": {"<search>": "in_search", "<answer>": "in_answer"},
    "in_search": {"</search>": "after_search"},
    "after_search": {"<information>": "in_information"},
    "in_information": {"</information>": "after_information"},
    "after_information": {"<think>": "in_think"},
    "in_answer": {"</answer>": "end"},
    "end": {},
}


def is_valid_format(response: str) -> bool:
    """SPEC §4 format: ``<think>…</think> (<search>…</search> <information>…</information>
    <think>…</think>)* <answer>…</answer>``; tags balanced, not nested, only whitespace between them
    and after the answer."""
    if not isinstance(response, str):
        return False
    state = "start"
    pos = 0
    for m in _TAG_RE.finditer(response):
        gap = response[pos : m.start()]
        if not state.startswith("in_") and gap.strip():
            return False  # stray text between tags
        nxt = _TRANSITIONS[state].get(m.group(0))
        if nxt is None:
            return False  # out-of-order, nested or unbalanced tag
        state = nxt
        pos = m.end()
    return state == "end" and not response[pos:].strip()


def exact_match(pred: str | None, golds: str | Iterable[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer, else 0.0."""
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return 1.0 if any(p == normalize_answer(g) for g in _as_list(golds)) else 0.0


def _f1_pair(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1(pred: str | None, golds: str | Iterable[str]) -> float:
    """SQuAD token F1 of the prediction against the best-matching gold answer."""
    if pred is None:
        return 0.0
    return max((_f1_pair(pred, g) for g in _as_list(golds)), default=0.0)


def em_format_score(response: str, golden_answers: list[str]) -> float:
    """Search-R1 format-shaped exact match: exactly the SPEC §4 table."""
    answer = extract_answer(response)
    valid = is_valid_format(response)
    if answer is None:
        return WRONG_VALID if valid else MISSING_INVALID
    if exact_match(answer, golden_answers) == 1.0:
        return CORRECT_VALID if valid else CORRECT_INVALID
    return WRONG_VALID if valid else WRONG_INVALID


def f1_format_score(response: str, golden_answers: list[str]) -> float:
    """The SPEC §4 table with token F1 in place of EM (linear between the wrong and correct rows)."""
    answer = extract_answer(response)
    valid = is_valid_format(response)
    if answer is None:
        return WRONG_VALID if valid else MISSING_INVALID
    score = f1(answer, golden_answers)
    if valid:
        return WRONG_VALID + (CORRECT_VALID - WRONG_VALID) * score
    return WRONG_INVALID + (CORRECT_INVALID - WRONG_INVALID) * score


def em_score(response: str, golden_answers: list[str]) -> float:
    """Plain EM of the last answer, no format shaping (evaluation)."""
    return exact_match(extract_answer(response), golden_answers)


def f1_score(response: str, golden_answers: list[str]) -> float:
    """Plain token F1 of the last answer, no format shaping (evaluation)."""
    return f1(extract_answer(response), golden_answers)


REWARDS: dict[str, RewardFn] = {
    "em_format": em_format_score,
    "f1_format": f1_format_score,
    "em": em_score,
    "f1": f1_score,
}


def get_reward(name_or_path: str | RewardFn) -> RewardFn:
    """A built-in reward by name, or a user's ``fn(response, golden_answers) -> float`` by import path."""
    if callable(name_or_path):
        return name_or_path
    if not isinstance(name_or_path, str):
        raise ValueError(f"reward must be a name or an import path, got {type(name_or_path).__name__}")
    if name_or_path in REWARDS:
        return REWARDS[name_or_path]
    if ":" not in name_or_path and "." not in name_or_path:
        raise ValueError(f"unknown reward {name_or_path!r}; built-ins: {sorted(REWARDS)} or 'pkg.module:fn'")
    from treegrpo.plugins import load_callable

    return load_callable(name_or_path)


__all__ = [
    "REWARDS",
    "RewardFn",
    "em_format_score",
    "em_score",
    "exact_match",
    "extract_answer",
    "f1",
    "f1_format_score",
    "f1_score",
    "get_reward",
    "is_valid_format",
    "normalize_answer",
]
