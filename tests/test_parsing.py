"""Step parsing: cut at the first action end tag; total on adversarial input."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treegrpo.envs.parsing import ParsedStep, parse_step
from treegrpo.rewards import em_format_score, extract_answer, is_valid_format


def test_search_and_answer():
    p = parse_step("<think>need it</think>\n<search> capital of France </search>")
    assert p == ParsedStep(
        "search", "capital of France", "<think>need it</think>\n<search> capital of France </search>"
    )
    a = parse_step("<think>ok</think><answer> Paris </answer>")
    assert (a.kind, a.content) == ("answer", "Paris")


def test_cut_at_first_end_tag_and_keep_token_tail_out():
    p = parse_step("<search>q1</search>\n<answer>x</answer>")
    assert (p.kind, p.content, p.cut_text) == ("search", "q1", "<search>q1</search>")
    p = parse_step("<answer>a</answer> <search>q</search>")
    assert (p.kind, p.content) == ("answer", "a")
    p = parse_step("<search>q</search>.\n")  # the tail of the token that held the stop tag
    assert p.cut_text == "<search>q</search>"


def test_last_opening_tag_before_the_cut():
    p = parse_step("<search>a <search>b</search>")
    assert (p.kind, p.content) == ("search", "b")
    p = parse_step("<answer>x <search>y</answer>")
    assert (p.kind, p.content) == ("answer", "x <search>y")


def test_invalid_cases():
    for text in [
        "",
        "just thinking",
        "<search>only an opening tag",
        "</search>",
        "no open</answer>",
        "<search></answer>",
    ]:
        p = parse_step(text)
        assert p.kind == "invalid", text
        assert p.content == ""
    assert parse_step("no tags").cut_text == "no tags"


def test_odd_inputs_do_not_raise():
    assert parse_step(None).kind == "invalid"
    assert parse_step(b"\xff\xfe<answer>x</answer>").content == "x"
    assert parse_step(12345).kind == "invalid"
    huge = "<think>" + "a" * 100_000 + "</think><search> q </search>"
    assert parse_step(huge).content == "q"
    assert parse_step("<answer>北京 🙂</answer>").content == "北京 🙂"


_TAGS = [
    "<search>",
    "</search>",
    "<answer>",
    "</answer>",
    "<think>",
    "</think>",
    "<information>",
    "</information>",
]
_pieces = st.one_of(
    st.sampled_from(_TAGS), st.text(max_size=20), st.binary(max_size=10).map(lambda b: b.decode("latin-1"))
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_pieces, max_size=30).map("".join))
def test_parse_and_reward_never_raise(text):
    p = parse_step(text)
    assert p.kind in ("search", "answer", "invalid")
    assert text.startswith(p.cut_text)
    if p.kind != "invalid":
        # The cut ends with the matching close tag and no earlier action close tag exists.
        assert p.cut_text.endswith(f"</{p.kind}>")
        body = p.cut_text[: -len(f"</{p.kind}>")]
        assert "</search>" not in body and "</answer>" not in body
        assert p.content == p.content.strip()
    else:
        assert p.content == ""
    # Rewards are total too.
    assert em_format_score(text, ["x"]) in (0.0, 0.1, 0.2, 0.8, 1.0)
    is_valid_format(text)
    extract_answer(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_binary_junk(data):
    assert parse_step(data).kind in ("search", "answer", "invalid")
