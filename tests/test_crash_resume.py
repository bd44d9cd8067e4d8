"""Faults during a real run: the retriever fails mid-run, the process is killed with SIGKILL.

- A real local retrieval server (the uvicorn app on 127.0.0.1) answers, then returns 500s, garbage
  and mis-shaped JSON, hangs past the timeout, and finally shuts down: the run completes and
  ``metrics.jsonl`` counts the failures in ``tools/failures``.
- ``treegrpo train`` in a subprocess is SIGKILLed at a random moment after its first checkpoint;
  ``--resume`` completes the run, loses at most the steps since the last checkpoint, and the steps
  after the resume point equal those of an uninterrupted run with the same seed.
- A half-written checkpoint directory (``.tmp-step-*``) is ignored by ``--resume`` and cleaned up.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from treegrpo.checkpoint import latest_checkpoint
from treegrpo.cli import main
from treegrpo.envs.search_r1 import SEARCH_FAILED_BODY
from treegrpo.retrievers import BM25Retriever
from treegrpo.retrievers.server import RetrieverServer, make_app
from treegrpo.run_log import read_metrics
from treegrpo.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("train/reward_mean", "loss", "budget/generated_tokens", "grad_norm")


def _run_dir(cfg: Path, name: str) -> Path:
    return Path(yaml.safe_load(cfg.read_text())["output_dir"]) / name


# ---- retriever outage mid-run ------------------------------------------------------------------------
TIMEOUT = 0.3
# One entry per HTTP attempt (the client makes 1 + max_retries attempts per search, 0.5 s apart).
SCHEDULE = [
    "ok",  # start-up connectivity check
    "ok",
    "ok",
    "500",  # transient: the retry succeeds, so no tool failure
    "ok",
    "500",
    "500",  # both attempts fail → one failed search
    "garbage",
    "shape",  # → failed search
    "slow",
    "garbage",  # → failed search
]
# Then, 3 attempts after step 1 is logged: "down" (a 503, then the server shuts down: every later
# search refused).


class _FaultyApp:
    """The real server's ASGI app, with the fault of the current attempt injected first."""

    def __init__(self, app: Any, metrics: Path) -> None:
        self.app, self.metrics = app, metrics
        self.lock, self.modes = threading.Lock(), []
        self.step2_from: int | None = None
        self.server: Any = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/retrieve":
            return await self.app(scope, receive, send)
        with self.lock:
            n = len(self.modes)
            mode = SCHEDULE[n] if n < len(SCHEDULE) else "ok"
            if self.step2_from is None and n >= len(SCHEDULE) and self.metrics.is_file():
                self.step2_from = n  # step 1 is logged: a few good searches, then the outage
            if self.step2_from is not None and n >= self.step2_from + 3:
                mode = "down"
            self.modes.append(mode)
        if mode == "ok":
            return await self.app(scope, receive, send)
        if mode == "slow":
            await anyio.sleep(3 * TIMEOUT)  # the client has given up by now
        if mode == "down":  # stop listening: this and every later attempt fails
            threading.Thread(target=lambda: (self.server.shutdown(), self.server.server_close())).start()
        body = {
            "500": b'{"error": "injected failure"}',
            "garbage": b'{"result": [[{"document": {"id": 1, "te',
            "shape": b'{"result": "nope"}',
        }.get(mode, b"{}")
        code = 200 if mode in ("garbage", "shape") else 500 if mode == "500" else 503
        headers = [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def test_retriever_outage_mid_run_becomes_observations_and_metrics(tiny_config: Path, capsys) -> None:
    cfg = yaml.safe_load(tiny_config.read_text())
    task = build_task("synthetic-kb", **cfg["data"]["task_kwargs"])  # the tiny config's task
    app = _FaultyApp(
        make_app(BM25Retriever(docs=task.corpus)), _run_dir(tiny_config, "outage") / "metrics.jsonl"
    )
    server = app.server = RetrieverServer(app, port=0).start()
    try:
        sets = [
            "name=outage",
            "trainer.steps=2",
            "trainer.eval_every=0",
            "env.retriever.kind=http",
            f"env.retriever.url={server.url}",
            f"env.retriever.timeout={TIMEOUT}",
            "env.retriever.max_retries=1",
            # every non-answer step searches, so the untrained tiny model hits the server each wave
            "env.name=reliability_plugins:SearchEveryStep",
            "env.kwargs={max_turns: 3, topk: 1, max_obs_tokens: 64}",
        ]
        args = ["train", "--config", str(tiny_config), "--no-progress"]
        for s in sets:
            args += ["--set", s]
        t0 = time.perf_counter()
        assert main(args) == 0, capsys.readouterr().err
        seconds = time.perf_counter() - t0
    finally:
        server.shutdown()
        server.server_close()
    modes: list[str] = app.modes
    assert set(modes) >= {"ok", "500", "garbage", "shape", "slow", "down"}, (len(modes), modes)
    run = _run_dir(tiny_config, "outage")
    rows = [r for r in read_metrics(run) if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2]
    failures = sum(r["tools/failures"] for r in rows)
    calls = sum(r["budget/tool_calls"] for r in rows)
    # 3 failed searches while the server was up (each fails every query of its batch), then all
    # searches after the shutdown; the transient 500 was absorbed by the retry.
    assert failures >= 4 and failures < calls, (failures, calls)
    assert rows[-1]["tools/failures"] > 0  # the server is gone before the run ends
    for r in rows:
        assert r["loss"] is not None
    obs = [
        n["observation"]
        for f in (run / "trees").glob("*.jsonl")
        for line in f.read_text().splitlines()
        for n in json.loads(line)["nodes"]
    ]
    assert any(SEARCH_FAILED_BODY in o for o in obs) and any("Doc 1(Title:" in o for o in obs)
    print(f"outage run: {len(modes)} HTTP attempts, {failures}/{calls} searches failed, {seconds:.1f}s")


# ---- kill -9 and resume ------------------------------------------------------------------------------
def test_sigkill_at_a_random_moment_then_resume_matches_the_uninterrupted_run(
    tiny_config: Path, tmp_path: Path
) -> None:
    steps = 10
    sets = [
        f"trainer.steps={steps}",
        "trainer.save_every=1",
        "trainer.eval_every=0",
        "trainer.save_trees_every=0",
    ]
    base = ["train", "--config", str(tiny_config), "--no-progress"]
    for s in sets:
        base += ["--set", s]
    assert main([*base, "--set", "name=full"]) == 0  # also fills the warm-start cache for the child
    full = {r["step"]: r for r in read_metrics(_run_dir(tiny_config, "full"))}

    run = _run_dir(tiny_config, "killed")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = tmp_path / "child.log"
    with open(log, "wb") as fh:  # a file, not a pipe: a full pipe would stall the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "treegrpo.cli", *base, "--set", "name=killed"],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        seen: dict[str, float] = {}
        while len(seen) < 2:  # the first two checkpoints time one step on this machine
            ckpt = latest_checkpoint(run / "checkpoints")
            if ckpt is not None:
                seen.setdefault(ckpt.name, time.monotonic())
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        t1, t2 = sorted(seen.values())
        delay = random.uniform(0.0, 4 * (t2 - t1))  # anywhere in the next ~4 of the 8 remaining steps
        time.sleep(delay)
        assert proc.poll() is None, f"the run finished within {delay:.2f}s of its second checkpoint"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt is not None
    k = int(ckpt.name.split("-")[1])
    logged = max((r["step"] for r in read_metrics(run)), default=0)
    assert 0 <= logged - k <= 1, (k, logged)  # lost at most the steps since the last checkpoint
    assert k < steps

    leftovers = len(list((run / "checkpoints").glob(".tmp-step-*")))
    assert main([*base, "--set", "name=killed", "--resume"]) == 0
    print(
        f"SIGKILL {delay:.2f}s after checkpoint 2: last logged step {logged}, resumed from {k}, "
        f"{leftovers} half-written checkpoint dir(s) left"
    )
    resumed = read_metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for r in resumed:
        for key in COMPARED:
            assert r[key] == full[r["step"]][key], (
                f"killed at {delay:.2f}s, resumed from {k}",
                r["step"],
                key,
            )
    assert not list((run / "checkpoints").glob(".tmp-step-*"))
    assert (run / "summary.json").is_file()


def test_half_written_checkpoint_is_ignored_and_cleaned(tiny_config: Path) -> None:
    base = ["train", "--config", str(tiny_config), "--no-progress", "--set", "name=half"]
    base += ["--set", "trainer.save_every=1", "--set", "trainer.eval_every=0"]
    assert main([*base, "--set", "trainer.steps=2"]) == 0
    ckpts = _run_dir(tiny_config, "half") / "checkpoints"
    tmp = ckpts / ".tmp-step-000003-999999"  # a writer killed while saving step 3
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x00" * 100)
    (tmp / "config.json").write_text('{"trunc')
    assert latest_checkpoint(ckpts) == ckpts / "step-000002"
    assert main([*base, "--set", "trainer.steps=3", "--resume"]) == 0
    assert not tmp.exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000003"]
    assert [r["step"] for r in read_metrics(_run_dir(tiny_config, "half"))] == [1, 2, 3]


@pytest.mark.parametrize("module", ["treegrpo", "treegrpo.cli"])
def test_python_dash_m_runs_the_cli(module: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run(
        [sys.executable, "-m", module, "config", "show", "--set", "rollout.m=3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["rollout"]["m"] == 3
