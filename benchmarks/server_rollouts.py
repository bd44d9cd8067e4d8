"""Tree rollouts on local `treegrpo serve-policy` servers: 1 vs 2 servers, sticky vs round-robin vs random routing.

Starts `treegrpo serve-policy --port 0` subprocesses serving the quickstart model (the same config
resolution as `train`), then samples Tree-GRPO rollouts of the quickstart task through `policy.backend:
openai` routing. Each configuration starts with empty server prefix caches (`/reset_prefix_cache`).
Reported per configuration: step time (one rollout of `--prompts` prompts), prompt tokens the servers
recomputed (prefill) vs served from their prefix cache, generated tokens/s.

`train_sync_async`: whole training steps (`treegrpo train` through one server) with
`trainer.async_rollouts` 0 and 1, side by side in one run: mean step time over the steps after the first
(the first async step has nothing prefetched), the sampling time and the time the trainer waited for it.

Run: python benchmarks/server_rollouts.py [--json] [--quick] [--train-steps N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUICK_SETS = ["warmstart.num_demos=64", "warmstart.epochs=1"]


def start_server(overrides: list[str], stack: ExitStack, timeout: float = 600.0) -> str:
    """A `treegrpo serve-policy --port 0` subprocess; returns its URL once it announces it."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, "-m", "treegrpo", "serve-policy", "--port", "0"]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )
    stack.callback(_stop, proc)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
        if m:
            return m.group(1)
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"serve-policy did not start (exit {proc.poll()})")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def call(url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="GET" if data is None else "POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def measure(cfg: Any, parts: Any, urls: list[str], routing: str, prompts: int, steps: int) -> dict[str, Any]:
    from treegrpo.data import batch_rows, group_ids_of
    from treegrpo.policies.routing import served_policy
    from treegrpo.rollout import sample_forests

    for u in urls:
        call(u, "/reset_prefix_cache", {})
    before = [call(u, "/health") for u in urls]
    pc = cfg.policy
    policy = served_policy(
        urls,
        parts.tokenizer,
        routing=routing,  # type: ignore[arg-type]
        seed=cfg.seed,
        client_kwargs={
            "temperature": pc.temperature,
            "top_p": pc.top_p,
            "max_new_tokens": pc.max_new_tokens,
            "max_context": int(parts.model.config.max_position_embeddings),
        },
    )
    rcfg = cfg.rollout
    rcfg.max_context_tokens = rcfg.max_context_tokens or int(parts.model.config.max_position_embeddings)
    times, generated = [], 0
    for step in range(steps):
        rows = batch_rows(parts.train_rows, step * prompts, prompts, cfg.seed)
        t0 = time.perf_counter()
        res = sample_forests(rows, group_ids_of(rows), policy, parts.env, rcfg, np.random.default_rng(step))
        times.append(time.perf_counter() - t0)
        generated += int(res.budget["generated_tokens"])
    after = [call(u, "/health") for u in urls]
    prompt_tokens = sum(a["prompt_tokens"] - b["prompt_tokens"] for a, b in zip(after, before, strict=True))
    prefill = sum(a["prefill_tokens"] - b["prefill_tokens"] for a, b in zip(after, before, strict=True))
    return {
        "servers": len(urls),
        "routing": routing,
        "step_seconds": float(np.mean(times)),
        "prompt_tokens": prompt_tokens,
        "prefill_tokens_recomputed": prefill,
        "server_prefix_hit": 1.0 - prefill / prompt_tokens if prompt_tokens else 0.0,
        "generated_tokens": generated,
        "tokens_per_second": generated / sum(times),
        "requests_per_server": [a["requests"] - b["requests"] for a, b in zip(after, before, strict=True)],
    }


def train_sync_async(
    overrides: list[str], url: str, prompts: int, steps: int, out_dir: Path
) -> dict[str, Any]:
    """Training steps through the server at `url`, sync vs one-step-off async (same seeds and data)."""
    from treegrpo.config import load_config
    from treegrpo.run_log import read_metrics
    from treegrpo.trainer import train

    out: dict[str, Any] = {}
    for mode in ("sync", "async"):
        sets = [
            *overrides,
            "policy.backend=openai",
            f"policy.base_url={url}",
            f"trainer.async_rollouts={int(mode == 'async')}",
            "trainer.tis_cap=2.0",
            f"trainer.steps={steps}",
            f"trainer.prompts_per_step={prompts}",
            "trainer.eval_every=0",
            "trainer.save_every=0",
            "trainer.save_trees_every=0",
            f"output_dir={out_dir}",
            f"name={mode}",
        ]
        call(url, "/reset_prefix_cache", {})
        with contextlib.redirect_stdout(sys.stderr):  # train() prints its summary; stdout is the JSON
            summary = train(load_config(None, sets), progress=False)
        rows = [r for r in read_metrics(Path(summary["run_dir"])) if r.get("step", 0) >= 2]

        def mean(key: str, rows: list[dict[str, Any]] = rows) -> float:
            return float(np.mean([r.get(key, 0.0) for r in rows])) if rows else float("nan")

        out[mode] = {
            "step_seconds": mean("time/step_seconds"),
            "rollout_seconds": mean("time/rollout_seconds"),
            "rollout_wait_seconds": mean("time/rollout_wait_seconds"),
            "staleness": [r.get("train/staleness") for r in rows],
            "logprob_mismatch": mean("train/logprob_mismatch"),
            "reward_mean": mean("train/reward_mean"),
        }
    out["speedup"] = out["sync"]["step_seconds"] / out["async"]["step_seconds"]
    out["steps_timed"] = max(steps - 1, 0)
    return out


def run(quick: bool, prompts: int, steps: int, train_steps: int = 0) -> dict[str, Any]:
    from treegrpo.build import build_run
    from treegrpo.config import load_config

    overrides = QUICK_SETS if quick else []
    cfg = load_config(None, overrides)
    parts = build_run(cfg, log=lambda s: None)  # the client's tokenizer/env (and the warm-start cache)
    out: dict[str, Any] = {}
    with ExitStack() as stack:
        urls = [start_server(overrides, stack) for _ in range(2)]
        out["1 server"] = measure(cfg, parts, urls[:1], "sticky", prompts, steps)
        out["2 servers sticky"] = measure(cfg, parts, urls, "sticky", prompts, steps)
        out["2 servers round_robin"] = measure(cfg, parts, urls, "round_robin", prompts, steps)
        out["2 servers random"] = measure(cfg, parts, urls, "random", prompts, steps)
        sync_async = None
        if train_steps > 1:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                sync_async = train_sync_async(overrides, urls[0], prompts, train_steps, Path(tmp))
    r = cfg.rollout
    return {
        "setup": {
            "model": "quickstart" + (" (quick warm start)" if quick else ""),
            "prompts_per_step": prompts,
            "steps": steps,
            "tree": f"({r.m},{r.n},{r.l}) {r.strategy}",
            "max_new_tokens": cfg.policy.max_new_tokens,
            "servers": "serve-policy subprocesses on this machine (CPU)",
        },
        "configs": out,
        "train_sync_async": sync_async,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="cheap warm start, 4 prompts, 1 step")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument(
        "--train-steps", type=int, default=None, help="training steps per mode for sync vs async (0: skip)"
    )
    args = ap.parse_args(argv)
    prompts = args.prompts if args.prompts is not None else (4 if args.quick else 16)
    steps = args.steps if args.steps is not None else (1 if args.quick else 3)
    if prompts < 1 or steps < 1:
        print("error: --prompts and --steps must be >= 1", file=sys.stderr)
        return 2
    train_steps = args.train_steps if args.train_steps is not None else (3 if args.quick else 6)
    if train_steps < 0:
        print("error: --train-steps must be >= 0", file=sys.stderr)
        return 2
    result = run(args.quick, prompts, steps, train_steps)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, r in result["configs"].items():
            print(
                f"{name:24s} step {r['step_seconds']:.2f}s  prefill {r['prefill_tokens_recomputed']:6d} / "
                f"{r['prompt_tokens']:6d} prompt tokens (hit {r['server_prefix_hit']:.2f})  "
                f"{r['tokens_per_second']:.0f} tok/s"
            )
        if sa := result["train_sync_async"]:
            print(
                f"train step: sync {sa['sync']['step_seconds']:.2f}s, async "
                f"{sa['async']['step_seconds']:.2f}s (speedup {sa['speedup']:.2f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
