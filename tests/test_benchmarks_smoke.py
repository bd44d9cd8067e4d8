"""Smoke tests of the benchmark scripts: they run, print one JSON object, and reject bad input cleanly."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


def _load(name: str):  # noqa: ANN202 - a script module
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_run_all_quick_budget_and_packing_print_one_json_object() -> None:
    proc = _run(str(BENCH / "run_all.py"), "--json", "--quick", "--only", "budget", "packing")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)  # the whole stdout is one JSON object
    assert set(out) == {"budget", "packing"}
    budget = out["budget"]["result"]
    assert budget["setup"]["prompts"] == 8  # --quick reached the script
    # chain(4) generates 4 full trajectories of 3 × 100 tokens per prompt
    assert budget["configs"]["chain(4)"]["generated_tokens"] == pytest.approx(1200.0)
    for name, shape in out["packing"]["result"]["shapes"].items():
        assert set(shape["modes"]) == {"leaf", "tree", "tree_rows", "path"}, name
        assert 0 < shape["forward_token_ratio"] < 1, name
        for key in ("wall_ratio", "peak_memory_ratio"):
            assert shape[key] > 0, (name, key)
        for mode in shape["modes"].values():
            assert mode["max_rel_grad_diff"] < 1e-4 and mode["loss_abs_diff"] < 1e-5, name
    assert set(out["packing"]["result"]["shapes"]) == {"synthetic", "quickstart"}
    assert all(out[k]["seconds"] > 0 and "--json" in out[k]["command"] for k in out)


def test_run_all_reports_a_failing_benchmark_and_rejects_unknown_names(tmp_path: Path) -> None:
    run_all = _load("run_all")
    assert run_all.parse_json('noise\n{"a": 1}\n') == {"a": 1}
    with pytest.raises(ValueError, match="no JSON"):
        run_all.parse_json("no json here")
    assert {"budget", "packing", "vs_trl"} <= set(run_all.available())
    proc = _run(str(BENCH / "run_all.py"), "--only", "nonexistent")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_vs_trl_rejects_bad_sizes_with_one_line() -> None:
    proc = _run(str(BENCH / "vs_trl.py"), "--prompts", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("--prompts must be >= 1")


def test_vs_trl_reward_and_env_are_what_the_docstring_says() -> None:
    vs = _load("vs_trl")
    assert vs.even_word_fraction("w2 w3 w10 w7") == pytest.approx(0.5)
    assert vs.even_word_fraction("") == 0.0
    env = vs.FixedPromptEnv(steps=2)
    s0, prompt = env.start({"id": 3, "prompt_ids": [5, 6, 7]})
    assert prompt == [5, 6, 7]
    (r1,) = env.step([s0], [" w2 w4"])
    assert not r1.done and r1.observation == "" and s0.turn == 0  # states are values
    (r2,) = env.step([r1.state], [" w1 w3"])
    assert r2.done and env.reward(r2.state) == pytest.approx(0.5)


@pytest.mark.skipif(
    importlib.util.find_spec("trl") is None, reason="trl not installed (pip install -e '.[bench]')"
)
def test_vs_trl_tiny_side_by_side_gives_ratios() -> None:
    proc = _run(
        str(BENCH / "vs_trl.py"),
        "--json",
        *("--systems", "trl_g4", "treegrpo_chain4"),
        *("--prompts", "2", "--prompt-tokens", "8", "--completion-tokens", "8", "--hidden", "32"),
        *("--layers", "1", "--steps", "1", "--warmup", "0", "--rounds", "1", "--threads", "1"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["trl_available"] is True
    trl, ours = out["systems"]["trl_g4"], out["systems"]["treegrpo_chain4"]
    assert trl["sequences_per_step"] == ours["sequences_per_step"] == 8  # 2 prompts × 4
    assert 0 < ours["trained_tokens_per_step"] <= 64 and 0 < trl["trained_tokens_per_step"] <= 64
    ratio = out["treegrpo_over_trl"]["chain"]
    assert ratio["train_time_per_trained_token"] > 0 and ratio["e2e_time_per_trained_token"] > 0
    assert set(out["treegrpo_over_trl"]) == {"chain"}  # pairs with a missing side are left out


def test_memory_quick_gives_points_per_mode_and_path_stays_small() -> None:
    proc = _run(str(BENCH / "memory.py"), "--json", "--quick")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert set(out["modes"]) == {"leaf", "tree", "tree_rows", "path"}
    for points in out["modes"].values():
        assert points and all(set(p) >= {"tree_tokens", "leaves", "peak_mb", "seconds"} for p in points)
        assert [p["tree_tokens"] for p in points] == sorted(p["tree_tokens"] for p in points)
    assert set(out["largest_under_cap"]) == set(out["modes"])
    biggest = {m: pts[-1]["peak_mb"] for m, pts in out["modes"].items()}
    assert biggest["path"] < biggest["leaf"]  # one path in memory, not every leaf's
