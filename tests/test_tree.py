"""The tree data model: structure helpers, flattened paths, and the JSON-lines round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from treegrpo.tree import (
    ActionKind,
    Forest,
    Tree,
    group_forests,
    leaf_arrays,
    read_jsonl,
    write_jsonl,
)


def build() -> Tree:
    """prompt [1,2] → s1 (search, obs [30,31]) → {s2 answer 1.0, s3 answer 0.2}; prompt → s4 answer 0.0."""
    t = Tree.new("q7", 1, [1, 2])
    s1 = t.add_child(
        0,
        token_ids=[10, 11],
        logprobs=[-0.1, -0.2],
        obs_ids=[30, 31],
        action=ActionKind.SEARCH,
        text="ab",
        observation="OBS",
        mean_entropy=1.5,
    )
    t.add_child(
        s1.id,
        token_ids=[12],
        logprobs=[-0.3],
        action=ActionKind.ANSWER,
        text="c",
        is_leaf=True,
        reward=1.0,
    )
    t.add_child(s1.id, token_ids=[13, 14], logprobs=[-0.4, -0.5], text="de", is_leaf=True, reward=0.2)
    t.add_child(0, token_ids=[15], logprobs=[-0.6], text="f", is_leaf=True, reward=0.0)
    return t


def test_structure_helpers() -> None:
    t = build()
    assert [n.depth for n in t.nodes] == [0, 1, 2, 2, 1]
    assert [n.id for n in t.leaves()] == [2, 3, 4]
    assert [n.id for n in t.internal_nodes()] == [0, 1]
    assert [(n.id, n.depth) for n in t.branch_points()] == [(0, 0), (1, 1)]
    assert t.ancestors(3) == [0, 1, 3]
    assert t.leaves_below(0) == [2, 3, 4]
    assert t.leaves_below(1) == [2, 3]
    assert t.context_ids(1) == [1, 2, 10, 11, 30, 31]
    assert t.response_text(2) == "abOBSc"


def test_path_masks_and_logprobs() -> None:
    p = build().path(3)
    assert p.token_ids == [1, 2, 10, 11, 30, 31, 13, 14]
    assert p.loss_mask == [0, 0, 1, 1, 0, 0, 1, 1]
    assert p.logprobs == [0.0, 0.0, -0.1, -0.2, 0.0, 0.0, -0.4, -0.5]
    assert p.node_ids == [0, 0, 1, 1, 1, 1, 3, 3]


def test_leaves_cannot_be_expanded() -> None:
    with pytest.raises(ValueError, match="leaf"):
        build().add_child(2, token_ids=[1])


def test_leaf_arrays_and_missing_reward() -> None:
    a, b = build(), build()
    b.tree_index = 2
    r, g, ti = leaf_arrays([Forest("q7", [a, b]), Forest("q8", [build()])])
    assert r == [1.0, 0.2, 0.0] * 3
    assert g == [0] * 6 + [1] * 3
    assert ti == [1, 1, 1, 2, 2, 2, 1, 1, 1]
    t = build()
    t.nodes[3].reward = None
    with pytest.raises(ValueError, match="no reward"):
        leaf_arrays([Forest("q7", [t])])


def test_jsonl_round_trip(tmp_path: Path) -> None:
    a = build()
    a.meta = {"answers": ["x"]}
    a.nodes[1].state = object()  # states are not serialized
    b = build()
    b.group_id = "q9"
    path = tmp_path / "trees.jsonl"
    write_jsonl([a, b], path)
    back = list(read_jsonl(path))
    assert [t.to_dict() for t in back] == [a.to_dict(), b.to_dict()]
    assert back[0].nodes[1].state is None
    assert back[0].nodes[1].action is ActionKind.SEARCH
    forests = group_forests(back)
    assert [f.group_id for f in forests] == ["q7", "q9"]
