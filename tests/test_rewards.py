"""The SPEC §4 reward table, its tricky cases, and reward plugins."""

from __future__ import annotations

import pytest

from treegrpo.envs.search_r1 import INVALID_ACTION_OBS, SearchR1Env
from treegrpo.plugins import PluginError
from treegrpo.rewards import (
    REWARDS,
    em_format_score,
    exact_match,
    extract_answer,
    f1,
    f1_format_score,
    get_reward,
    is_valid_format,
    normalize_answer,
)

VALID_CORRECT = (
    "<think>I need the capital.</think>\n<search> capital of France </search>\n\n"
    "<information>Doc 1(Title: Paris) Paris is the capital of France.</information>\n\n"
    "<think>It is Paris.</think>\n<answer> Paris </answer>"
)
GOLD = ["Paris"]


# ---- SPEC §4 table: one test per row ----------------------------------------------------------
def test_correct_valid_format_is_1():
    assert is_valid_format(VALID_CORRECT)
    assert em_format_score(VALID_CORRECT, GOLD) == 1.0


def test_correct_invalid_format_is_0_8():
    r = "Paris, I think. <answer>Paris</answer>"
    assert not is_valid_format(r)
    assert em_format_score(r, GOLD) == 0.8


def test_wrong_valid_format_is_0_2():
    r = "<think>hmm</think><answer>Lyon</answer>"
    assert is_valid_format(r)
    assert em_format_score(r, GOLD) == 0.2


def test_wrong_invalid_format_is_0_1():
    r = "<answer>Lyon</answer> trailing words"
    assert not is_valid_format(r)
    assert em_format_score(r, GOLD) == 0.1


def test_no_answer_invalid_format_is_0():
    for r in ["", "Paris", "<think>Paris</think>", "<answer>Paris", "Paris</answer>"]:
        assert extract_answer(r) is None
        assert em_format_score(r, GOLD) == 0.0


# ---- tricky cases ----------------------------------------------------------------------------
def test_prompt_example_answer_is_not_part_of_the_response():
    """The instruction contains '<answer> Beijing </answer>'; the reward only sees the response."""
    env = SearchR1Env(retriever=_NoRetriever(), max_turns=0)
    state, prompt = env.start({"question": "Capital of China?", "golden_answers": ["Beijing"]})
    assert "<answer> Beijing </answer>" in prompt[-1]["content"]
    final = env.step([state], ["<think>I am not sure, I give up.</think>"])[0].state
    assert final.done and extract_answer(final.response) is None
    assert env.reward(final) == 0.0
    # Scoring prompt + response (the reference's input) would have "found" the example answer.
    assert em_format_score(prompt[-1]["content"] + final.response, ["Beijing"]) == 0.8


def test_two_answers_last_wins():
    r = "<think>a</think><answer>Lyon</answer><answer>Paris</answer>"
    assert extract_answer(r) == "Paris"
    assert em_format_score(r, GOLD) == 0.8  # correct, but two answers is not the valid grammar
    r2 = "<think>a</think><answer>Paris</answer><answer>Lyon</answer>"
    assert em_format_score(r2, GOLD) == 0.1


def test_stray_close_tag_does_not_swallow_answer():
    assert extract_answer("<answer>Paris</answer></answer>") == "Paris"
    assert extract_answer("<answer>a <answer>Paris</answer>") == "Paris"
    assert extract_answer("</answer><answer>Rome</answer>") == "Rome"


@pytest.mark.parametrize(
    "response",
    [
        "<think>a<think>b</think></think><answer>Paris</answer>",  # nested
        "<think>a</think><think>b</think><answer>Paris</answer>",  # think twice without search
        "<think>a</think><search>q</search><answer>Paris</answer>",  # no information after search
        "<think>a</think><search>q</search><information>x</information><answer>Paris</answer>",
        "<think>a</think><search>q<answer>Paris</answer>",  # unbalanced search
        "<think>a</think>\nSo:<answer>Paris</answer>",  # text between tags
        "<answer>Paris</answer>",  # no think first
        "<think>a</think><answer>Paris</answer>\nDone.",  # text after the answer
        "<think>a</think><answer>Paris</answer><think>b</think>",  # tags after the answer
        "<think>a</think><answer>Paris",  # unclosed answer
        "<think>a</think>" + INVALID_ACTION_OBS + "<think>b</think><answer>Paris</answer>",
    ],
)
def test_invalid_formats(response):
    assert not is_valid_format(response)
    if extract_answer(response) is not None:
        assert em_format_score(response, GOLD) in (0.8, 0.1)


def test_whitespace_between_tags_is_allowed():
    r = "  <think> a </think> \n\n <search>q</search>\n<information>x</information>\t<think>b</think> <answer>Paris</answer>\n"
    assert is_valid_format(r)
    assert em_format_score(r, GOLD) == 1.0


def test_normalization_case_punctuation_articles():
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("Theater") == "theater"  # 'the' only as a word
    assert exact_match("the PARIS.", ["Paris"]) == 1.0
    assert exact_match("Paris France", ["Paris"]) == 0.0
    assert exact_match(None, ["Paris"]) == 0.0
    assert exact_match("paris", "Paris") == 1.0  # a bare string gold
    r = "<think>x</think><answer> THE paris. </answer>"
    assert em_format_score(r, GOLD) == 1.0


def test_any_gold_counts():
    assert em_format_score("<think>x</think><answer>NYC</answer>", ["New York City", "NYC"]) == 1.0


def test_f1_and_f1_format():
    assert f1("Barack Obama", ["Obama"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1("x", ["y", "x"]) == 1.0
    assert f1(None, ["x"]) == 0.0
    # Same table at F1 in {0, 1}.
    for r in [VALID_CORRECT, "Paris <answer>Paris</answer>", "<think>a</think><answer>Lyon</answer>", "x"]:
        assert f1_format_score(r, GOLD) == pytest.approx(em_format_score(r, GOLD))
    partial_valid = "<think>a</think><answer>Barack Obama</answer>"
    partial_invalid = "<answer>Barack Obama</answer>"
    s = f1("Barack Obama", ["Obama"])
    assert f1_format_score(partial_valid, ["Obama"]) == pytest.approx(0.2 + 0.8 * s)
    assert f1_format_score(partial_invalid, ["Obama"]) == pytest.approx(0.1 + 0.7 * s)


def test_get_reward_by_name_and_import_path():
    assert get_reward("em_format") is em_format_score
    assert set(REWARDS) >= {"em_format", "f1_format"}
    fn = get_reward("treegrpo.rewards:f1_format_score")
    assert fn is f1_format_score
    assert get_reward("treegrpo.rewards.em_format_score") is em_format_score
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("nope")
    with pytest.raises(PluginError, match="cannot import"):
        get_reward("no_such_pkg_xyz.mod:fn")
    with pytest.raises(PluginError, match="no attribute"):
        get_reward("treegrpo.rewards:missing_fn")
    with pytest.raises(PluginError, match="non-callable"):
        get_reward("treegrpo.rewards:CORRECT_VALID")


class _NoRetriever:
    def search(self, queries, topk):
        return [[] for _ in queries]
