"""Smoke test of benchmarks/learning.py at tiny sizes: equal-budget runs, curves, summary, JSON and plot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():  # noqa: ANN202 - a script module
    spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "benchmarks" / "learning.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_learning_quick_equal_budget_runs_make_curves_summary_and_plot(
    tmp_path: Path, shared_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    learning = _load()
    budget = 400
    rc = learning.main(
        [
            "--json",
            "--quick",
            "--seeds",
            "2",
            "--budget",
            str(budget),
            "--checkpoints",
            "2",
            "--eval-size",
            "4",
            "--arms",
            "tree(2,2,1)",
            "chain(4)",
            "--set",
            f"cache_dir={shared_cache}",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON object
    assert result["partial"] is False
    assert result["setup"]["seeds"] == [0, 1]
    assert result["setup"]["arm_overrides"]["chain(4)"][-1] == "advantage.estimator=grpo"
    runs = result["runs"]
    # Main pair, seed by seed: tree and chain of one seed back to back.
    assert [(r["arm"], r["seed"]) for r in runs] == [
        ("tree(2,2,1)", 0),
        ("chain(4)", 0),
        ("tree(2,2,1)", 1),
        ("chain(4)", 1),
    ]
    start = result["setup"]["warm_start_em"]
    for r in runs:
        curve = r["curve"]
        assert curve[0]["step"] == 0 and curve[0]["generated_tokens"] == 0 and curve[0]["eval_em"] == start
        assert r["reached_budget"] and curve[-1]["generated_tokens"] >= budget
        assert len(curve) == 1 + 2  # the start + one point per checkpoint, even when a step crosses two
        assert curve[1]["generated_tokens"] >= budget / 2
        assert curve[-1]["step"] == r["steps"] and r["final_em"] == curve[-1]["eval_em"]
        for count in learning.COUNTS:  # every budget count grows along the curve
            xs = [p[count] for p in curve]
            assert xs == sorted(xs)
        for p in curve:
            assert p["generated_plus_prefill_tokens"] == p["generated_tokens"] + p["prefill_tokens"]
            assert 0.0 <= p["eval_em"] <= 1.0
    # Chains of 4 vs trees of (2,2,1): 4 vs 6 trajectories per prompt, 4 prompts per step.
    tree_run, chain_run = runs[0], runs[1]
    assert chain_run["curve"][-1]["trajectories"] == 16 * chain_run["steps"]
    assert tree_run["curve"][-1]["trajectories"] == 24 * tree_run["steps"]
    arms = result["summary"]["arms"]
    assert set(arms) == {"tree(2,2,1)", "chain(4)"}
    fin = arms["chain(4)"]["final_em"]
    assert fin["n"] == 2 and fin["min"] <= fin["mean"] <= fin["max"]
    assert fin["values"] == [runs[1]["final_em"], runs[3]["final_em"]]
    group = result["summary"]["groups"]["tree(2,2,1) vs chain(4)"]
    common = group["at_common_budget"]["generated_tokens"]["budget"]
    assert common == min(r["curve"][-1]["generated_tokens"] for r in runs)
    assert set(group["at_common_budget"]) == set(learning.COUNTS)
    saved = json.loads((tmp_path / "learning_quick.json").read_text())
    assert saved["runs"] == runs
    png = tmp_path / "learning_quick.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learning_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    learning = _load()
    for bad in (["--budget", "0"], ["--seeds", "0"], ["--arms", "tree(9,9,9)"]):
        with pytest.raises(SystemExit) as e:
            learning.main(bad)
        assert e.value.code == 2
    assert "--budget must be > 0" in capsys.readouterr().err


def test_learning_bad_override_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    learning = _load()
    rc = learning.main(["--quick", "--set", "rollout.m=0", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: rollout.m") and "\n" not in err
