"""RL-signal diagnostics: exact values on hand-built forests."""

from __future__ import annotations

import pytest

from treegrpo.diagnostics import SignalWarnings, no_signal_warning, signal_diagnostics
from treegrpo.rewards import is_valid_format
from treegrpo.tree import ActionKind, Forest, Tree


def _chain(group: str, idx: int, steps: list[tuple[int, ActionKind, str]], reward: float) -> Tree:
    t = Tree.new(group, idx, [1, 2, 3])
    parent = 0
    for k, (n_tok, action, text) in enumerate(steps):
        last = k == len(steps) - 1
        obs = "<information>d</information>" if action == ActionKind.SEARCH else ""
        node = t.add_child(
            parent, token_ids=[5] * n_tok, logprobs=[-1.0] * n_tok, action=action, text=text, observation=obs
        )
        if last:
            node.is_leaf, node.reward = True, reward
        parent = node.id
    return t


def test_values_on_a_mixed_batch():
    good = "<think>x</think><answer>a</answer>"
    # Group A: rewards differ (signal). Group B: both leaves 0.0 (no signal), steps hit the budget.
    a = Forest(
        "a",
        [
            _chain(
                "a",
                0,
                [(4, ActionKind.SEARCH, "<think>t</think><search>q</search>"), (3, ActionKind.ANSWER, good)],
                1.0,
            ),
            _chain("a", 1, [(2, ActionKind.ANSWER, good)], 0.2),
        ],
    )
    b = Forest(
        "b",
        [
            _chain("b", 0, [(8, ActionKind.INVALID, "ramble"), (8, ActionKind.FORCED_FINAL, "ramble")], 0.0),
            _chain("b", 1, [(8, ActionKind.TRUNCATED, "ramble")], 0.0),
        ],
    )
    d = signal_diagnostics([a, b], max_new_tokens=8, format_valid=is_valid_format)
    assert d["signal/zero_variance_groups"] == pytest.approx(0.5)
    # 6 steps: search, answer, answer closed; invalid, forced final without answer, truncated not.
    assert d["signal/action_closed_rate"] == pytest.approx(3 / 6)
    assert d["signal/step_tokens_mean"] == pytest.approx((4 + 3 + 2 + 8 + 8 + 8) / 6)
    assert d["signal/truncated_step_share"] == pytest.approx(3 / 6)
    # Leaf responses are the texts of their paths: group A's two are valid, group B's are not.
    assert d["signal/format_valid_rate"] == pytest.approx(2 / 4)
    assert no_signal_warning(d) is None  # half, not most


def test_warning_names_the_cause():
    b = Forest("b", [_chain("b", i, [(8, ActionKind.INVALID, "x")], 0.0) for i in range(3)])
    d = signal_diagnostics([b], max_new_tokens=8)
    assert "signal/format_valid_rate" not in d
    msg = no_signal_warning(d)
    assert msg is not None and msg.startswith("no RL signal: 100% of prompts have zero reward variance")
    assert "hit the token budget" in msg and "\n" not in msg


def test_empty_is_zero_not_nan():
    d = signal_diagnostics([], max_new_tokens=8, format_valid=is_valid_format)
    assert all(v == 0.0 for v in d.values())


def test_warnings_are_rate_limited_within_a_streak():
    """First step of a flat streak warns, then every 10th step of it; a good step ends the streak."""
    flat, ok = {"signal/zero_variance_groups": 0.8}, {"signal/zero_variance_groups": 0.2}
    w = SignalWarnings(every=10)
    printed = [w.check(flat) is not None for _ in range(21)]
    assert [i for i, p in enumerate(printed) if p] == [0, 10, 20]
    assert w.check(ok) is None
    assert w.check(flat) is not None  # a new streak warns at once
