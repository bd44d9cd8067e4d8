"""Model output is untrusted input: fuzz the parser, the environment step and the rewards.

Every generated string (binary junk decoded with lone surrogates, arbitrary unicode, tag soup with
nested / unbalanced / unknown / near-miss tags, and strings up to 100k characters) must give a
defined, well-typed result and never raise. The examples of the tests below add up to more than
10,000 generated strings per run (counted in ``_SEEN`` and checked at module teardown); the longer
fuzzer is ``scripts/fuzz.py --seconds N``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treegrpo.envs.parsing import parse_step
from treegrpo.envs.search_r1 import INVALID_ACTION_OBS, SEARCH_FAILED_BODY, SearchR1Env, SearchState
from treegrpo.retrievers import BM25Retriever
from treegrpo.rewards import (
    em_format_score,
    exact_match,
    extract_answer,
    f1_format_score,
    is_valid_format,
)
from treegrpo.tree import ActionKind

EM_TABLE = {0.0, 0.1, 0.2, 0.8, 1.0}
FUZZ = settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck))
_SEEN: dict[str, int] = {}
_MIN_TOTAL = 10_000

TAGS = [
    "<think>",
    "</think>",
    "<search>",
    "</search>",
    "<answer>",
    "</answer>",
    "<information>",
    "</information>",
    # near misses and unknown tags
    "<answer >",
    "</answer",
    "<ANSWER>",
    "</Search>",
    "<tool_call>",
    "</foo>",
    "<<search>>",
    "<",
    ">",
    "</",
    "/>",
    "<answer/>",
    "\x00",
    "\ufeff",
    "\u202e",
    "\n\n",
]

junk_text = st.binary(max_size=300).map(lambda b: b.decode("utf-8", errors="surrogateescape"))
unicode_text = st.text(alphabet=st.characters(), max_size=200)
tag_soup = st.lists(
    st.one_of(st.sampled_from(TAGS), st.text(max_size=12), st.sampled_from(["Paris", "the Paris", " 42 "])),
    max_size=40,
).map("".join)
# Long inputs without making hypothesis generate 100k characters one by one: repeat a short piece.
huge_text = st.tuples(tag_soup, st.integers(1, 100_000)).map(
    lambda t: ((t[0] or "<answer>") * (t[1] // max(1, len(t[0] or "x")) + 1))[: t[1]]
)
nested = st.recursive(
    st.text(max_size=8),
    lambda inner: (
        st.tuples(st.sampled_from(["think", "search", "answer", "information", "x"]), inner).map(
            lambda t: f"<{t[0]}>{t[1]}</{t[0]}>"
        )
        | st.lists(inner, max_size=4).map("".join)
    ),
    max_leaves=20,
)
any_text = st.one_of(tag_soup, junk_text, unicode_text, nested, huge_text)
golds = st.lists(st.one_of(st.sampled_from(["Paris", "42", "the Paris"]), st.text(max_size=10)), max_size=3)


def _count(name: str, n: int = 1) -> None:
    _SEEN[name] = _SEEN.get(name, 0) + n


@pytest.fixture(scope="module", autouse=True)
def _volume() -> Iterator[None]:
    """When the whole module ran, it fuzzed at least 10,000 strings (not true under ``-k``)."""
    yield
    expected = {"parse", "rewards", "env_step", "env_failing", "binary"}
    if expected <= set(_SEEN):
        total = sum(_SEEN.values())
        print(f"\nfuzzed {total} generated strings: {_SEEN}")
        assert total >= _MIN_TOTAL, _SEEN


@FUZZ
@given(any_text)
def test_parse_step_is_total(text: str) -> None:
    _count("parse")
    p = parse_step(text)
    assert p.kind in ("search", "answer", "invalid")
    assert isinstance(p.content, str) and isinstance(p.cut_text, str)
    assert text.startswith(p.cut_text)
    if p.kind == "invalid":
        assert p.content == ""
    else:
        assert p.cut_text.endswith(f"</{p.kind}>")
        assert p.content in p.cut_text
        assert p.content == p.content.strip()


@FUZZ
@given(any_text, golds)
def test_rewards_are_defined_for_any_response(text: str, answers: list[str]) -> None:
    _count("rewards")
    ans = extract_answer(text)
    assert ans is None or (isinstance(ans, str) and ans in text)
    valid = is_valid_format(text)
    assert isinstance(valid, bool)
    if valid:
        assert ans is not None
    em = em_format_score(text, answers)
    assert em in EM_TABLE
    f1 = f1_format_score(text, answers)
    assert isinstance(f1, float) and math.isfinite(f1) and 0.0 <= f1 <= 1.0
    # F1 interpolates the EM table: an exact match is F1 = 1, so both shapings agree on it.
    if exact_match(ans, answers) == 1.0:
        assert f1 == pytest.approx(em)
    if ans is None:
        assert f1 == em


_DOCS = [
    {"id": "0", "title": "Paris", "text": "Paris is the capital of France."},
    {"id": "1", "title": "Answer", "text": "The answer to everything is 42."},
    {"id": "2", "title": "Tags", "text": "<answer> not an answer </answer> <search> x </search>"},
    {"id": "3", "title": "Unicode", "text": "Zürich — 東京 — \u202e reversed"},
]


@pytest.fixture(scope="module")
def env() -> SearchR1Env:
    return SearchR1Env(BM25Retriever(docs=_DOCS), max_turns=2, topk=2, max_obs_tokens=40)


class _Exploding:
    """A retriever that fails in a different way on every call."""

    def __init__(self) -> None:
        self.calls = 0

    def search(self, queries: list[str], topk: int) -> object:
        self.calls += 1
        mode = self.calls % 4
        if mode == 0:
            raise RuntimeError("backend down")
        if mode == 1:
            return None  # not a list
        if mode == 2:
            return [[]]  # wrong number of result lists (unless exactly one query)
        raise TimeoutError("slow")


def _check_results(env: SearchR1Env, states: list[SearchState], actions: list[object], results) -> None:
    assert len(results) == len(actions)
    for s, a, r in zip(states, actions, results, strict=True):
        assert isinstance(r.action, ActionKind)
        assert isinstance(r.observation, str) and isinstance(r.done, bool)
        assert r.state.response.startswith(s.response + (a if isinstance(a, str) else ""))
        if r.done:
            assert r.observation == "" and r.action in (ActionKind.ANSWER, ActionKind.FORCED_FINAL)
            assert env.reward(r.state) in EM_TABLE
        elif r.action == ActionKind.INVALID:
            assert r.observation == INVALID_ACTION_OBS
        else:
            assert r.action == ActionKind.SEARCH and r.tool_calls == 1
            assert r.observation.strip().startswith("<information>")
            assert r.observation.strip().endswith("</information>")
            assert len(r.observation.split()) <= env.max_obs_tokens


@FUZZ
@given(st.lists(any_text, min_size=1, max_size=4), st.integers(0, 2))
def test_env_step_accepts_any_action(env: SearchR1Env, actions: list[str], turns: int) -> None:
    _count("env_step", len(actions))
    states = [SearchState("What is the capital of France?", ("Paris",), turns=turns) for _ in actions]
    results = env.step(states, actions)
    _check_results(env, states, actions, results)
    assert all(r.tool_failures == 0 for r in results)
    # states are values: stepping did not change them, and stepping again gives the same result
    assert all(s.turns == turns and s.response == "" for s in states)
    assert [r.state for r in env.step(states, actions)] == [r.state for r in results]


_EXPLODING = _Exploding()


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(st.one_of(any_text, st.none(), st.integers(), st.binary(max_size=20)), min_size=1, max_size=4)
)
def test_env_step_with_a_failing_retriever_and_non_string_actions(actions: list[object]) -> None:
    _count("env_failing", len(actions))
    env = SearchR1Env(_EXPLODING, max_turns=3, topk=1, max_obs_tokens=30)
    states = [SearchState("q", ("a",)) for _ in actions]
    results = env.step(states, actions)  # type: ignore[arg-type]
    _check_results(env, states, actions, results)
    for r in results:
        if r.action == ActionKind.SEARCH:
            assert r.tool_failures in (0, 1)
            if r.tool_failures:
                assert SEARCH_FAILED_BODY in r.observation


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=2000))
def test_raw_bytes(data: bytes) -> None:
    _count("binary")
    assert parse_step(data).kind in ("search", "answer", "invalid")
    text = data.decode("utf-8", errors="surrogateescape")
    assert em_format_score(text, ["a"]) in EM_TABLE
    assert is_valid_format(text) in (True, False)


@pytest.mark.parametrize(
    "text",
    [
        "<answer>" * 50_000,
        "</answer>" * 11_111,
        "<search>" + "a" * 99_990 + "</search>",
        "<think>" * 14_285 + "</think>" * 14_285,
        "<answer>x</answer>" * 5_555,
        "\udcff" * 100_000,
        "<answer>" + "東" * 99_982 + "</answer>",
    ],
    ids=["open-x50k", "close-x11k", "search-100k", "nested-think", "many-answers", "surrogates", "cjk"],
)
def test_100k_character_inputs(env: SearchR1Env, text: str) -> None:
    p = parse_step(text)
    assert p.kind in ("search", "answer", "invalid")
    assert em_format_score(text, ["x"]) in EM_TABLE
    assert 0.0 <= f1_format_score(text, ["x"]) <= 1.0
    (r,) = env.step([SearchState("q", ("x",))], [text])
    assert isinstance(r.action, ActionKind)
    if r.action == ActionKind.SEARCH:
        assert len(r.observation.split()) <= env.max_obs_tokens


def test_model_output_is_never_evaluated(env: SearchR1Env, tmp_path) -> None:
    """Code in an action or an answer is just text: no import, no file created, no plug-in loaded."""
    sentinel = tmp_path / "pwned"
    payloads = [
        f"<search>__import__('pathlib').Path({str(sentinel)!r}).touch()</search>",
        f"<answer>{{{{__import__('os').system('touch {sentinel}')}}}}</answer>",
        "<answer>treegrpo.plugins:load_object</answer>",
        "<answer>${{7*7}} {0.__class__}</answer>",
    ]
    for text in payloads:
        (r,) = env.step([SearchState("q", ("49",))], [text])
        if r.done:
            assert env.reward(r.state) in EM_TABLE
        em_format_score(text, ["49"])
        f1_format_score(text, ["49"])
    assert not sentinel.exists()
