"""One `train` per run directory: a second concurrent run is refused; a dead holder's lock is taken over."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from treegrpo.cli import main
from treegrpo.run_log import read_metrics
from treegrpo.runlock import LOCK_NAME, RunDirLocked, run_dir_lock

ROOT = Path(__file__).resolve().parents[1]


def _run_dir(cfg: Path, name: str) -> Path:
    return Path(yaml.safe_load(cfg.read_text())["output_dir"]) / name


def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with run_dir_lock(run) as path:
        assert path == run / LOCK_NAME and path.read_text().strip() == str(os.getpid())
        with pytest.raises(RunDirLocked, match=rf"pid {os.getpid()}\)"), run_dir_lock(run):
            pass
    with run_dir_lock(run):  # released on exit: a later run takes it
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # A process that took the lock and was SIGKILLed while holding it.
    code = f"import os, sys; sys.path.insert(0, {str(ROOT / 'src')!r}); from treegrpo.runlock import run_dir_lock\n"
    code += f"with run_dir_lock(__import__('pathlib').Path({str(run)!r})): os.kill(os.getpid(), 9)"
    r = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert r.returncode == -9
    assert (run / LOCK_NAME).read_text().strip().isdigit()  # the dead holder's pid is still in the file
    with run_dir_lock(run) as path:
        assert path.read_text().strip() == str(os.getpid())


def test_two_concurrent_trains_on_one_run_dir(tiny_config: Path, tmp_path: Path) -> None:
    base = ["train", "--config", str(tiny_config), "--no-progress", "--set", "name=shared"]
    base += ["--set", "trainer.eval_every=0", "--set", "trainer.save_every=1", "--set", "trainer.steps=3"]
    assert main([*base, "--set", "name=warm", "--set", "trainer.steps=1"]) == 0  # fill the warm-start cache
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs, logs, started = [], [], []
    for i, lr in enumerate(("1e-4", "2e-4")):
        logs.append(tmp_path / f"run{i}.log")
        with open(logs[-1], "wb") as fh:
            started.append(time.monotonic())
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "treegrpo", *base, "--set", f"trainer.lr={lr}"],
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                )
            )
    ended: dict[int, float] = {}
    deadline = time.monotonic() + 300
    while len(ended) < 2 and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.monotonic()
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [lg.read_text() for lg in logs]
    winner = next(i for i, p in enumerate(procs) if p.returncode == 0)
    loser = 1 - winner
    lines = [ln for ln in logs[loser].read_text().splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and f"(pid {procs[winner].pid})" in lines[0], lines[0]
    assert ended[loser] < ended[winner]  # refused while the other still ran, not after waiting for it
    print(
        f"refused in {ended[loser] - started[loser]:.1f}s; the other run took {ended[winner] - started[winner]:.1f}s"
    )
    run = _run_dir(tiny_config, "shared")
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]  # one run's steps, once each
    lr = float(("1e-4", "2e-4")[winner])
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["lr"] == lr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert main([*base, "--resume", "--set", f"trainer.lr={lr}", "--set", "trainer.steps=4"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_the_refusal_names_a_holder_that_writes_its_pid_just_after_locking(tmp_path):
    """The race CI hit: the holder has the lock but has not written its pid yet."""
    import fcntl
    import threading

    run = tmp_path / "r"
    run.mkdir()
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked, file still empty
        threading.Timer(0.2, lambda: os.pwrite(fd, b"4242\n", 0)).start()
        with pytest.raises(RunDirLocked, match=r"\(pid 4242\)"), run_dir_lock(run):
            pass
    finally:
        os.close(fd)
