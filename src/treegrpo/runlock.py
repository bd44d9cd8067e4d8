"""One `treegrpo train` per run directory: an OS-level lock held for the life of the run.

Two runs writing into one directory would interleave `metrics.jsonl` and overwrite each other's
checkpoints and config. The lock is `fcntl.flock` on `RUN_DIR/.lock`: the kernel releases it when
the holder exits or is killed (even by SIGKILL), so a stale lock file from a dead process is simply
taken over. The holder's pid is written into the file only to name it in the refusal message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from treegrpo.errors import UserError

LOCK_NAME = ".lock"


class RunDirLocked(UserError):
    """Another live process holds the run directory."""


def _holder_pid(fd: int, wait: float = 1.0) -> str:
    """The holder's pid from the lock file. The holder writes it just after taking the lock, so an empty
    file is retried for up to `wait` seconds before the pid is called unknown."""
    deadline = time.monotonic() + wait
    while True:
        try:
            raw = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        except OSError:
            return "unknown"
        if raw.isdigit():
            return raw
        if time.monotonic() >= deadline:
            return "unknown"
        time.sleep(0.01)


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[Path]:
    """Hold an exclusive lock on `run_dir` (created if needed) or raise RunDirLocked naming the holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirLocked(
                f"{run_dir}: another `treegrpo train` (pid {_holder_pid(fd)}) is using this run directory; "
                "wait for it to finish or choose another name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            # The file stays: unlinking it would let a third process lock a fresh inode while a
            # second one still waits on the old one. Closing releases the lock.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def is_main_launch_process() -> bool:
    """Under `accelerate launch` / torchrun only global rank 0 takes the lock (ranks share one run)."""
    return os.environ.get("RANK", "0") in ("", "0")


__all__ = ["LOCK_NAME", "RunDirLocked", "is_main_launch_process", "run_dir_lock"]
