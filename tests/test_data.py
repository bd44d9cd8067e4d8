"""Dataset loaders: Search-R1/verl parquet, jsonl, HF save_to_disk; normalized rows and errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from treegrpo.data import DataError, load_hf_dataset, load_jsonl, load_parquet, load_rows
from treegrpo.envs.search_r1 import SearchR1Env


def _verl_row(source: str, index: int, question: str, targets: list[str]) -> dict:
    return {
        "id": f"train_{index}",
        "question": question,
        "golden_answers": targets,
        "data_source": source,
        "prompt": [{"role": "user", "content": f"Answer it. Question: {question}\n"}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": targets}},
        "extra_info": {"split": "train", "index": index},
    }


def test_verl_parquet_rows_and_unique_group_ids(tmp_path):
    rows = [
        _verl_row("nq", 0, "who wrote hamlet", ["Shakespeare", "William Shakespeare"]),
        _verl_row("nq", 1, "capital of peru", ["Lima"]),
        _verl_row("hotpotqa", 0, "who directed alien", ["Ridley Scott"]),  # same index, other source
    ]
    path = tmp_path / "train.parquet"
    pd.DataFrame(rows).to_parquet(path)
    out = load_rows(path)
    assert [r["group_id"] for r in out] == ["nq/0", "nq/1", "hotpotqa/0"]
    first = out[0]
    assert first["question"] == "who wrote hamlet"
    assert first["golden_answers"] == ["Shakespeare", "William Shakespeare"]
    assert first["data_source"] == "nq" and first["index"] == 0 and isinstance(first["index"], int)
    assert first["prompt"] == [{"role": "user", "content": "Answer it. Question: who wrote hamlet\n"}]
    assert all(isinstance(g, str) for r in out for g in r["golden_answers"])
    # The env uses the dataset's prompt as-is.
    env = SearchR1Env(retriever=None)  # type: ignore[arg-type]
    state, prompt = env.start(first)
    assert prompt == first["prompt"] and state.golden_answers == ("Shakespeare", "William Shakespeare")


def test_verl_parquet_without_question_or_golden_answers_columns(tmp_path):
    row = _verl_row("nq", 5, "capital of peru", ["Lima"])
    del row["question"], row["golden_answers"]
    path = tmp_path / "t.parquet"
    pd.DataFrame([row]).to_parquet(path)
    (r,) = load_parquet(path)
    assert r["question"] == "capital of peru" and r["golden_answers"] == ["Lima"] and r["group_id"] == "nq/5"


def test_duplicate_source_index_is_an_error(tmp_path):
    path = tmp_path / "dup.parquet"
    pd.DataFrame([_verl_row("nq", 3, "a", ["x"]), _verl_row("nq", 3, "b", ["y"])]).to_parquet(path)
    with pytest.raises(DataError, match=r"dup\.parquet row 1: group id 'nq/3' repeats row 0"):
        load_rows(path)


def test_jsonl_rows(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        json.dumps({"question": " Who? ", "golden_answers": ["A", 7]})
        + "\n\n"
        + json.dumps({"question": "What?", "golden_answers": "B"})
        + "\n",
        encoding="utf-8",
    )
    out = load_jsonl(path)
    assert out == [
        {
            "question": "Who?",
            "golden_answers": ["A", "7"],
            "data_source": "qa",
            "index": 0,
            "group_id": "qa/0",
        },
        {"question": "What?", "golden_answers": ["B"], "data_source": "qa", "index": 1, "group_id": "qa/1"},
    ]
    assert load_rows(path, data_source="mine", limit=1)[0]["group_id"] == "mine/0"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"question": "q", "golden_answers": ["a"]}\n{oops\n', r"qa\.jsonl line 2 \(row 1\): invalid JSON"),
        ('{"golden_answers": ["a"]}\n', r"qa\.jsonl row 0: missing or empty 'question'"),
        ('{"question": "q"}\n', r"qa\.jsonl row 0: 'golden_answers'"),
        ('{"question": "q", "golden_answers": []}\n', r"row 0: 'golden_answers'"),
        ('{"question": "q", "golden_answers": [{"x": 1}]}\n', r"row 0: 'golden_answers'"),
        ('{"question": "q", "golden_answers": ["a"], "prompt": [1]}\n', r"row 0: 'prompt'"),
        ('["q", "a"]\n', r"row 0: row is a list"),
        ("\n", r"dataset is empty"),
    ],
)
def test_jsonl_errors_name_file_and_row(tmp_path, content, match):
    path = tmp_path / "qa.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        load_rows(path)


def test_unreadable_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="cannot read"):
        load_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"cannot read parquet .*bad\.parquet"):
        load_rows(bad)
    other = tmp_path / "x.csv"
    other.write_text("a,b\n")
    with pytest.raises(DataError, match="unknown format"):
        load_rows(other)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(DataError, match="bin.jsonl"):
        load_rows(binary)


def test_hf_datasets_directory(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(
        [
            {"question": "q0", "golden_answers": ["a0"], "data_source": "triviaqa"},
            {"question": "q1", "golden_answers": ["a1", "b1"], "data_source": "triviaqa"},
        ]
    )
    single = tmp_path / "single"
    ds.save_to_disk(str(single))
    out = load_rows(single)
    assert [r["group_id"] for r in out] == ["triviaqa/0", "triviaqa/1"]
    assert out[1]["golden_answers"] == ["a1", "b1"]
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    both = tmp_path / "both"
    dd.save_to_disk(str(both))
    assert len(load_hf_dataset(both)) == 2  # "train" by default
    assert len(load_hf_dataset(both, split="test")) == 1
    with pytest.raises(DataError, match="choose a split"):
        load_hf_dataset(both, split="validation")
    with pytest.raises(DataError, match="cannot load Hugging Face dataset"):
        load_hf_dataset(tmp_path)  # a directory that is not a dataset
