"""Run every benchmark (each in its own subprocess) and print one JSON object keyed by benchmark.

    python benchmarks/run_all.py [--json] [--quick] [--only NAME ...]

Benchmarks: budget.py, packing.py, memory.py, vs_trl.py, and learning.py when that file exists. Each runs with `--json`;
`--quick` passes smaller settings (and `--quick` itself to the scripts that take it) for a fast smoke run.
A benchmark that fails or prints no JSON is reported as {"error": ...} and makes the exit status 1; the
others still run. Without `--json` a short per-benchmark summary is printed instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ORDER = ("budget", "packing", "memory", "credit", "vs_trl", "learning")
# Smaller settings for --quick (the scripts' own flags; vs_trl and learning take --quick themselves).
QUICK_ARGS: dict[str, list[str]] = {
    "budget": ["--prompts", "8"],
    "packing": ["--quick"],
    "memory": ["--quick"],
    "credit": ["--quick"],
    "vs_trl": ["--quick"],
    "learning": ["--quick"],
}


def available() -> list[str]:
    """Benchmarks present in this checkout (learning.py is optional)."""
    return [name for name in ORDER if (HERE / f"{name}.py").is_file()]


def parse_json(stdout: str) -> Any:
    """The script's JSON object: the whole stdout, or else its last line that parses."""
    text = stdout.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON object on stdout")


def run_one(name: str, quick: bool, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--json", *(QUICK_ARGS.get(name, []) if quick else [])]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    src = HERE.parent / "src"
    if src.is_dir():  # works from a plain checkout too, not only after `pip install -e .`
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "command": " ".join(cmd[1:])}
    seconds = round(time.perf_counter() - t0, 2)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return {"error": f"exit {proc.returncode}: {tail}", "command": " ".join(cmd[1:]), "seconds": seconds}
    try:
        result = parse_json(proc.stdout)
    except ValueError as e:
        return {"error": str(e), "command": " ".join(cmd[1:]), "seconds": seconds}
    return {"result": result, "command": " ".join(cmd[1:]), "seconds": seconds}


def summary_line(name: str, entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"{name:<9} ERROR {entry['error']}"
    r = entry["result"]
    head = f"{name:<9} {entry['seconds']:>7.1f} s  "
    if name == "budget":
        rows = r["configs"]
        return head + "  ".join(f"{k}: {v['generated_tokens']:.0f} gen" for k, v in rows.items())
    if name == "packing":
        return head + (
            f"forward-token ratio {r['forward_token_ratio']}, wall ratio {r['wall_ratio']}, "
            f"max rel grad diff {r['max_rel_grad_diff']:.2e}"
        )
    if name == "vs_trl":
        if not r.get("trl_available", True):
            return head + str(r.get("skipped"))
        return head + "  ".join(
            f"{k}: train/tok {v['train_time_per_trained_token']}, mem {v['working_memory']}"
            for k, v in r["treegrpo_over_trl"].items()
        )
    return head + ", ".join(sorted(r)[:8])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object keyed by benchmark")
    ap.add_argument("--quick", action="store_true", help="small settings for a fast smoke run")
    ap.add_argument("--only", nargs="+", choices=ORDER, help="run only these benchmarks")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark (default 3600)")
    args = ap.parse_args(argv)
    names = [n for n in available() if not args.only or n in args.only]
    missing = [n for n in args.only or [] if n not in available()]
    if missing:
        ap.error(f"benchmark file not found: {', '.join(f'benchmarks/{n}.py' for n in missing)}")
    out: dict[str, Any] = {}
    for name in names:
        out[name] = run_one(name, args.quick, args.timeout)
        if not args.json:
            print(summary_line(name, out[name]), flush=True)
    if args.json:
        print(json.dumps(out))
    return 1 if any("error" in v for v in out.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
