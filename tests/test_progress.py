"""Plain-text progress (no terminal): the warm start shows a line every 50 steps and at least every 30 s."""

from __future__ import annotations

import treegrpo.progress as progress
from treegrpo.progress import RunProgress


def test_slow_warm_start_prints_at_least_every_30_seconds(monkeypatch, capsys):
    clock = iter([0.0, 10.0, 31.0, 40.0, 75.0, 80.0, 81.0])  # creation, then one reading per step
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    on_step = RunProgress(enabled=False).sft_callback()
    # step 1 at 10 s: nothing; 2 at 31 s: due (and resets the clock, read again); 3 at 75 s: due; 4: last
    for step in range(1, 5):
        on_step(step, 4, 1.0 / step)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "warm start: step 2/4 loss 0.500",
        "warm start: step 3/4 loss 0.333",
        "warm start: step 4/4 loss 0.250",
    ]


def test_quiet_processes_print_nothing(capsys):
    on_step = RunProgress(enabled=False, quiet=True).sft_callback()
    for step in range(1, 51):
        on_step(step, 50, 0.1)
    assert capsys.readouterr().err == ""
