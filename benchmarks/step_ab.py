"""The quickstart RL step, an old commit against this checkout, interleaved on the same machine.

    python benchmarks/step_ab.py [--old cafb52c] [--reps 3] [--steps 3] [--json]

The old commit is checked out into a temporary git worktree and run with `PYTHONPATH` on its `src/` and
this checkout's virtual environment; each side has its own cache directory, so its warm start is built
once (a 1-step warm-up run, not timed) and reused. Then `--reps` runs of `--steps` RL steps alternate
old, new, old, new, ... with evaluation and checkpoints off. The figures are the medians over the runs of
the per-step means of `time/step_seconds` and `time/rollout_seconds` from each run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from treegrpo.run_log import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def _run(src: Path, work: Path, side: str, rep: str, steps: int) -> dict[str, float]:
    name = f"ab-{side}-{rep}"
    cmd = [sys.executable, "-m", "treegrpo", "train", "--set", f"name={name}"]
    for kv in (
        f"cache_dir={work / ('cache_' + side)}",
        f"output_dir={work / 'runs'}",
        f"trainer.steps={steps}",
        "trainer.eval_every=0",
        "trainer.save_every=0",
    ):
        cmd += ["--set", kv]
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{side} run failed: {proc.stderr.strip().splitlines()[-1:]}")
    rows = [r for r in read_metrics(work / "runs" / name) if "time/step_seconds" in r]
    step = statistics.fmean(r["time/step_seconds"] for r in rows)
    rollout = statistics.fmean(r["time/rollout_seconds"] for r in rows)
    return {"step_seconds": step, "rollout_seconds": rollout, "update_seconds": step - rollout}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="cafb52c", help="the commit to compare against")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="RL steps per run")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        old_src = work / "old"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_src), a.old],
            check=True,
            capture_output=True,
        )
        try:
            sides = {"old": old_src / "src", "new": ROOT / "src"}
            for side, src in sides.items():
                _run(src, work, side, "warmup", 1)
            runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
            for rep in range(a.reps):
                for side, src in sides.items():
                    runs[side].append(_run(src, work, side, str(rep), a.steps))
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_src)], check=False
            )
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
    out = {
        "old": a.old,
        "reps": a.reps,
        "steps_per_run": a.steps,
        "runs": runs,
        "median": med,
        "step_speedup": med["old"]["step_seconds"] / med["new"]["step_seconds"],
        "update_speedup": med["old"]["update_seconds"] / med["new"]["update_seconds"],
    }
    if a.json:
        print(json.dumps(out))
    else:
        for s, m in med.items():
            print(f"{s}: step {m['step_seconds']:.2f} s  rollout {m['rollout_seconds']:.2f} s")
        print(f"step speed-up {out['step_speedup']:.2f}x, update {out['update_speedup']:.2f}x")


if __name__ == "__main__":
    main()
