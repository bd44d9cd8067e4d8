"""Smoke test of benchmarks/server_rollouts.py: one JSON object with the keys the README table reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "server_rollouts.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def test_bad_arguments_exit_2():
    proc = _run("--prompts", "0")
    assert proc.returncode == 2 and "must be >= 1" in proc.stderr


@pytest.mark.slow
def test_quick_run_prints_one_json_object():
    proc = _run("--json", "--quick", "--prompts", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["setup"]["prompts_per_step"] == 2
    assert set(out["configs"]) == {
        "1 server",
        "2 servers sticky",
        "2 servers round_robin",
        "2 servers random",
    }
    for r in out["configs"].values():
        assert 0 < r["prefill_tokens_recomputed"] < r["prompt_tokens"]
        assert r["server_prefix_hit"] == pytest.approx(
            1 - r["prefill_tokens_recomputed"] / r["prompt_tokens"]
        )
        assert r["step_seconds"] > 0 and r["tokens_per_second"] > 0
        assert sum(r["requests_per_server"]) > 0
    assert out["configs"]["2 servers sticky"]["requests_per_server"][0] > 0  # both servers used
    assert out["configs"]["2 servers sticky"]["requests_per_server"][1] > 0
    sa = out["train_sync_async"]
    assert sa["steps_timed"] == 2
    assert sa["sync"]["staleness"] == [0.0, 0.0] and sa["async"]["staleness"] == [1.0, 1.0]
    for mode in ("sync", "async"):
        assert sa[mode]["rollout_seconds"] > 0 and sa[mode]["step_seconds"] > 0
    assert 0 <= sa["async"]["rollout_wait_seconds"] <= sa["async"]["step_seconds"]
    assert sa["speedup"] == pytest.approx(sa["sync"]["step_seconds"] / sa["async"]["step_seconds"])
