"""How fast does each planted mistake's rate fall, by strategy? (the learning side of benchmarks/credit.py)

    python benchmarks/credit_curves.py [--json] [--quick] [--steps 12] [--every 4] [--seeds 1]
                                       [--prompts 16] [--eval 48] [--arms random chain ...]

From the planted-decision warm start of `benchmarks/credit.py` (step 0: search or guess; step 2: the
gold or the other name of the last fact), each arm trains with its own strategy and estimator and, every
`--every` steps, samples one chain per held-out question with the training temperature and counts the
two mistakes: answering at step 0 (early) and answering the distractor at the last step (late).
`--quick`: tiny sizes, pipeline check only (numbers mean nothing). Writes credit_curves(_quick).json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from credit import FullParts, mistake_rates  # noqa: E402  (the sibling benchmark script)
from treegrpo.build import RunParts  # noqa: E402
from treegrpo.errors import UserError  # noqa: E402
from treegrpo.rollout import sample_forests  # noqa: E402

ARMS: dict[str, list[str]] = {
    "random": [
        "rollout.strategy=random",
        "rollout.m=2",
        "rollout.n=2",
        "rollout.l=1",
        "advantage.estimator=tree",
    ],
    "chain": ["rollout.strategy=chain", "rollout.num_generations=4", "advantage.estimator=grpo"],
    "fixed_depth=2": [
        "rollout.strategy=fixed_depth",
        "rollout.fixed_depth=2",
        "rollout.m=2",
        "rollout.n=2",
        "rollout.l=1",
        "advantage.estimator=tree",
    ],
}
QUICK_SETS = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "warmstart.num_demos=32",
    "warmstart.epochs=1",
]


def measure(full: FullParts, model: Any, rows: list[dict[str, Any]], seed: int) -> dict[str, float]:
    """Planted-mistake rates of one sampled chain per row under the current weights."""
    policy = full.make_policy(model, full.parts.tokenizer, full.cfg, greedy=False, seed=seed)
    cfg = copy.deepcopy(full.base)
    cfg.strategy, cfg.num_generations = "chain", 1
    res = sample_forests(
        rows, [f"curve/{i}" for i in range(len(rows))], policy, full.parts.env, cfg, rng=seed
    )
    rewards = [leaf.reward or 0.0 for f in res.forests for _, leaf in f.leaves()]
    return {**mistake_rates(res.forests, rows), "reward": float(np.mean(rewards))}


def run_arm(full: FullParts, arm: str, seed: int, steps: int, every: int, prompts: int, rows: list) -> list:
    from treegrpo.config import load_config
    from treegrpo.trainer import Trainer

    cfg = load_config(
        None,
        [
            *full.overrides,
            *ARMS[arm],
            f"seed={seed}",
            f"trainer.prompts_per_step={prompts}",
            "trainer.eval_every=0",
        ],
        full.preset,
    )
    parts = RunParts(
        model=copy.deepcopy(full.parts.model),
        tokenizer=full.parts.tokenizer,
        env=full.parts.env,
        train_rows=full.parts.train_rows,
        eval_rows=[],
        task=full.parts.task,
        warmstart=full.parts.warmstart,
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, parts, Path(tmp))
        curve = [{"step": 0, "generated_tokens": 0.0, **measure(full, trainer.model, rows, seed)}]
        while trainer.step < steps:
            trainer.train_step()
            if trainer.step % every == 0 or trainer.step == steps:
                point = measure(full, trainer.model, rows, seed)
                gen = float(trainer.totals.get("generated_tokens", 0.0))
                curve.append({"step": trainer.step, "generated_tokens": gen, **point})
    return curve


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a pipeline check, numbers mean nothing")
    ap.add_argument("--steps", type=int, default=None, help="RL steps per arm (default 12; quick 2)")
    ap.add_argument("--every", type=int, default=None, help="measure every N steps (default 4; quick 1)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (default 16; quick 2)")
    ap.add_argument(
        "--eval", type=int, default=None, help="held-out questions measured (default 48; quick 4)"
    )
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    steps = args.steps if args.steps is not None else (2 if args.quick else 12)
    every = args.every if args.every is not None else (1 if args.quick else 4)
    prompts = args.prompts if args.prompts is not None else (2 if args.quick else 16)
    n_eval = args.eval if args.eval is not None else (4 if args.quick else 48)
    if min(steps, every, prompts, n_eval, args.seeds) < 1:
        raise UserError("--steps, --every, --prompts, --eval and --seeds must be >= 1")
    t0 = time.perf_counter()
    full = FullParts(args.preset, [*(QUICK_SETS if args.quick else []), *args.sets])
    rows = list(full.parts.eval_rows[:n_eval])
    curves: dict[str, list[list[dict[str, float]]]] = {arm: [] for arm in args.arms}
    for seed in range(args.seeds):
        for arm in args.arms:
            curves[arm].append(run_arm(full, arm, seed, steps, every, prompts, rows))
            print(f"seed {seed} {arm} done at {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    result = {
        "setup": {
            "mode": "quick" if args.quick else "full",
            "steps": steps,
            "every": every,
            "prompts_per_step": prompts,
            "eval_questions": len(rows),
            "seeds": args.seeds,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "curves": curves,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("credit_curves_quick.json" if args.quick else "credit_curves.json")).write_text(
        json.dumps(result, indent=2)
    )
    if args.json:
        print(json.dumps(result))
    else:
        for arm, runs in curves.items():
            for p in runs[0]:
                print(
                    f"{arm:14s} step {p['step']:3d}  guess {p['guess_at_step0']:.2f}  "
                    f"distractor {p['distractor_at_last_step']:.2f}  reward {p['reward']:.2f}"
                )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
