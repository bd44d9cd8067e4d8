"""Learning at equal budget: Tree-GRPO vs chain GRPO from one shared warm start, several seeds each.

    python benchmarks/learning.py [--json] [--quick] [--seeds 3] [--budget TOKENS] [--preset quickstart]
                                  [--set k=v ...] [--arms NAME ...] [--eval-size N] [--out DIR]

Every run starts from the SAME warm-started model (built or loaded from the cache once, deep-copied per
run), gets a fresh in-process `Trainer` and its own seed (the same seeds for every arm, so runs pair up),
and trains until its cumulative generated tokens reach `--budget`. Held-out greedy EM on a fixed eval
subset is measured at `--checkpoints` evenly spaced budget points. The budget is counted three ways
(generated tokens; generated + prefill tokens; tool calls) and EM is also compared at the arms' common
budget under each count. Arms: tree (2,2,1) vs chain GRPO 4; tree (1,2,1) vs chain 2 (the paper's
smallest-budget case); tree (2,2,1) with random vs fixed_depth (depth 1) vs depth_stratified expansion.
Writes `learning.json` (after every run, so a cut-short run keeps what it has) and `learning.png` to
`--out`; `--quick` uses tiny sizes (numbers not meaningful) and writes `learning_quick.*` instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from treegrpo.build import RunParts, build_run
from treegrpo.config import Config, load_config
from treegrpo.errors import UserError
from treegrpo.evaluation import evaluate
from treegrpo.policy_factory import make_policy
from treegrpo.trainer import Trainer

HERE = Path(__file__).resolve().parent
TREE_ESTIMATORS = ("tree", "tree_intra", "tree_inter", "tree_2norm")

# Arm name → rollout / advantage overrides. The order is the run order: the main pair first, so a run
# that is cut short still has it complete.
ARMS: dict[str, list[str]] = {
    "tree(2,2,1)": ["rollout.strategy=random", "rollout.m=2", "rollout.n=2", "rollout.l=1"],
    "chain(4)": ["rollout.strategy=chain", "rollout.num_generations=4", "advantage.estimator=grpo"],
    "tree(1,2,1)": ["rollout.strategy=random", "rollout.m=1", "rollout.n=2", "rollout.l=1"],
    "chain(2)": ["rollout.strategy=chain", "rollout.num_generations=2", "advantage.estimator=grpo"],
    "tree(2,2,1) fixed_depth=1": [
        "rollout.strategy=fixed_depth",
        "rollout.fixed_depth=1",
        "rollout.m=2",
        "rollout.n=2",
        "rollout.l=1",
    ],
    "tree(2,2,1) depth_stratified": [
        "rollout.strategy=depth_stratified",
        "rollout.m=2",
        "rollout.n=2",
        "rollout.l=1",
    ],
}
# "tree(2,2,1)" is the random-expansion arm of the strategy ablation too.
GROUPS: dict[str, list[str]] = {
    "tree(2,2,1) vs chain(4)": ["tree(2,2,1)", "chain(4)"],
    "tree(1,2,1) vs chain(2)": ["tree(1,2,1)", "chain(2)"],
    "expansion strategy, tree(2,2,1)": [
        "tree(2,2,1)",
        "tree(2,2,1) fixed_depth=1",
        "tree(2,2,1) depth_stratified",
    ],
}
# The three ways of counting the budget: name → function of a checkpoint record.
COUNTS = ("generated_tokens", "generated_plus_prefill_tokens", "tool_calls")

# Tiny sizes for --quick (the TINY config of tests/conftest.py): the pipeline runs end to end in about a
# minute; the numbers mean nothing.
QUICK_SETS = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "data.task_kwargs={seed: 0, n_entities: 40, max_hops: 2}",
    "env.max_turns=3",
    "policy.max_new_tokens=24",
    "trainer.prompts_per_step=4",
    "warmstart.num_demos=16",
    "warmstart.epochs=1",
]


def arm_overrides(arm: str, base: Config) -> list[str]:
    """The arm's settings; tree arms keep the preset's tree estimator (else the paper's `tree`)."""
    extra = list(ARMS[arm])
    if not any(o.startswith("advantage.estimator=") for o in extra):
        est = base.advantage.estimator if base.advantage.estimator in TREE_ESTIMATORS else "tree"
        extra.append(f"advantage.estimator={est}")
    return extra


def spread(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(a.size),
        "values": [float(x) for x in a],
    }


def _point(step: int, totals: dict[str, float], em: float, reward: float | None) -> dict[str, Any]:
    gen = float(totals.get("generated_tokens", 0.0))
    prefill = float(totals.get("prefill_tokens", 0.0))
    return {
        "step": step,
        "generated_tokens": gen,
        "prefill_tokens": prefill,
        "generated_plus_prefill_tokens": gen + prefill,
        "tool_calls": float(totals.get("tool_calls", 0.0)),
        "trajectories": float(totals.get("trajectories", 0.0)),
        "eval_em": em,
        "train_reward_recent": reward,
    }


def train_one(
    cfg: Config,
    parts: RunParts,
    base_model: Any,
    eval_rows: list[dict[str, Any]],
    start_em: float,
    budget: float,
    checkpoints: int,
    max_steps: int,
    run_dir: Path,
    keep: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One run: fresh model copy and Trainer, train until `budget` generated tokens, EM at checkpoints.

    `keep`: metric keys to record for every step (returned as `per_step`); each curve point also has the
    wall `seconds` since the run started."""
    run_parts = RunParts(
        model=copy.deepcopy(base_model),
        tokenizer=parts.tokenizer,
        env=parts.env,
        train_rows=parts.train_rows,
        eval_rows=eval_rows,
        task=parts.task,
        warmstart=parts.warmstart,
    )
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_parts, run_dir)
    marks = [budget * k / checkpoints for k in range(1, checkpoints + 1)]
    curve = [{**_point(0, {}, start_em, None), "seconds": 0.0}]
    rewards: list[float] = []
    per_step: list[dict[str, float]] = []
    skipped = 0
    while trainer.step < max_steps:
        m = trainer.train_step()
        m.pop("_forests", None)
        per_step.append({k: float(m[k]) for k in keep if k in m})
        skipped += int(m.get("train/skipped", 0.0))
        rewards.append(float(m["train/reward_mean"]))
        gen = trainer.totals.get("generated_tokens", 0.0)
        done = gen >= budget
        if marks and gen >= marks[0]:
            em = evaluate(trainer.greedy, parts.env, eval_rows)["eval/em"]
            point = _point(trainer.step, trainer.totals, em, float(np.mean(rewards[-5:])))
            point["seconds"] = time.perf_counter() - t0
            # One point per budget mark crossed (a big step may cross several), so every run's curve
            # has checkpoints + 1 points and curves line up index by index across seeds.
            while marks and gen >= marks[0]:
                marks.pop(0)
                curve.append(dict(point))
        if done:
            break
    if curve[-1]["step"] != trainer.step:  # hit max_steps before the budget: still end on an eval
        em = evaluate(trainer.greedy, parts.env, eval_rows)["eval/em"]
        curve.append(_point(trainer.step, trainer.totals, em, float(np.mean(rewards[-5:]))))
        curve[-1]["seconds"] = time.perf_counter() - t0
    return {
        "steps": trainer.step,
        "seconds": time.perf_counter() - t0,
        "reached_budget": trainer.totals.get("generated_tokens", 0.0) >= budget,
        "skipped_steps": skipped,
        "final_em": curve[-1]["eval_em"],
        "train_reward_first5": float(np.mean(rewards[:5])),
        "train_reward_last5": float(np.mean(rewards[-5:])),
        "curve": curve,
        "per_step": per_step,
    }


def _interp_em(curve: list[dict[str, Any]], count: str, x: float) -> float:
    xs = np.asarray([p[count] for p in curve], dtype=np.float64)
    ys = np.asarray([p["eval_em"] for p in curve], dtype=np.float64)
    return float(np.interp(x, xs, ys))


def summarize(runs: list[dict[str, Any]], arms: list[str], checkpoints: int) -> dict[str, Any]:
    """Per-arm final EM ± spread, budgets, mean curves; per-group EM at the common budget per count."""
    by_arm: dict[str, list[dict[str, Any]]] = {a: [r for r in runs if r["arm"] == a] for a in arms}
    out_arms: dict[str, Any] = {}
    for arm, rs in by_arm.items():
        if not rs:
            continue
        # Mean curve at the nominal checkpoints (0, B/k, …, B): points are indexed, x is each count's mean.
        n_pts = min(len(r["curve"]) for r in rs)
        mean_curve = []
        for i in range(n_pts):
            pts = [r["curve"][i] for r in rs]
            em = [p["eval_em"] for p in pts]
            row = {c: float(np.mean([p[c] for p in pts])) for c in COUNTS}
            row.update(
                em_mean=float(np.mean(em)),
                em_std=float(np.std(em, ddof=1)) if len(em) > 1 else 0.0,
                em_min=float(np.min(em)),
                em_max=float(np.max(em)),
            )
            mean_curve.append(row)
        final = [r["curve"][-1] for r in rs]
        out_arms[arm] = {
            "seeds": [r["seed"] for r in rs],
            "final_em": spread([r["final_em"] for r in rs]),
            "em_gain_over_warm_start": spread([r["final_em"] - r["curve"][0]["eval_em"] for r in rs]),
            "final_budget": {c: spread([p[c] for p in final]) for c in (*COUNTS, "trajectories")},
            "steps": spread([float(r["steps"]) for r in rs]),
            "seconds": spread([r["seconds"] for r in rs]),
            "train_reward_last5": spread([r["train_reward_last5"] for r in rs]),
            "curve_mean": mean_curve,
        }
    groups: dict[str, Any] = {}
    for name, members in GROUPS.items():
        present = [a for a in members if by_arm.get(a)]
        if len(present) < 2:
            continue
        g: dict[str, Any] = {"arms": present, "at_common_budget": {}}
        for count in COUNTS:
            # The largest budget every run of the group reached under this count; EM interpolated there.
            common = min(r["curve"][-1][count] for a in present for r in by_arm[a])
            g["at_common_budget"][count] = {
                "budget": common,
                "em": {
                    a: spread([_interp_em(r["curve"], count, common) for r in by_arm[a]]) for a in present
                },
            }
        first, second = present[0], present[1]
        paired = {r["seed"]: r["final_em"] for r in by_arm[second]}
        diffs = [r["final_em"] - paired[r["seed"]] for r in by_arm[first] if r["seed"] in paired]
        g[f"final_em_diff {first} - {second} (paired by seed)"] = spread(diffs)
        groups[name] = g
    return {"arms": out_arms, "groups": groups}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(GROUPS)
    fig, axes = plt.subplots(
        len(COUNTS), len(groups), figsize=(5 * len(groups), 3.6 * len(COUNTS)), squeeze=False
    )
    runs = result["runs"]
    for col, gname in enumerate(groups):
        for row, count in enumerate(COUNTS):
            ax = axes[row][col]
            for arm in GROUPS[gname]:
                rs = [r for r in runs if r["arm"] == arm]
                if not rs:
                    continue
                n = min(len(r["curve"]) for r in rs)
                xs = np.mean([[p[count] for p in r["curve"][:n]] for r in rs], axis=0)
                ys = np.asarray([[p["eval_em"] for p in r["curve"][:n]] for r in rs])
                mean = ys.mean(axis=0)
                (line,) = ax.plot(xs, mean, marker="o", ms=3, label=f"{arm} (n={len(rs)})")
                ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.15)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
            ax.set_xlabel(count.replace("_", " "))
            ax.set_ylabel("held-out greedy EM")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(gname, fontsize=10)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
    fig.suptitle("EM vs budget: mean over seeds, band = min..max", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        f"budget {s['budget']:.0f} generated tokens/run, seeds {s['seeds']}, eval n={s['eval_size']}, "
        f"warm-start EM {s['warm_start_em']:.3f}" + ("  [PARTIAL]" if result["partial"] else ""),
        "",
        f"{'arm':<30}{'final EM mean':>14}{'std':>7}{'min':>7}{'max':>7}{'steps':>7}"
        f"{'gen tok':>9}{'gen+prefill':>12}{'tools':>8}{'traj':>7}",
    ]
    lines.append("-" * len(lines[-1]))
    for arm, a in result["summary"]["arms"].items():
        f, b = a["final_em"], a["final_budget"]
        lines.append(
            f"{arm:<30}{f['mean']:>14.3f}{f['std']:>7.3f}{f['min']:>7.3f}{f['max']:>7.3f}"
            f"{a['steps']['mean']:>7.1f}{b['generated_tokens']['mean']:>9.0f}"
            f"{b['generated_plus_prefill_tokens']['mean']:>12.0f}{b['tool_calls']['mean']:>8.0f}"
            f"{b['trajectories']['mean']:>7.0f}"
        )
    for gname, g in result["summary"]["groups"].items():
        lines += ["", f"{gname}: EM at the common budget (mean ± std over seeds)"]
        for count, c in g["at_common_budget"].items():
            ems = "  ".join(f"{a}: {v['mean']:.3f}±{v['std']:.3f}" for a, v in c["em"].items())
            lines.append(f"  {count:<30} @ {c['budget']:>9.0f}   {ems}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, about a minute; numbers not meaningful")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3; --quick 2)")
    ap.add_argument("--seed0", type=int, default=0, help="first seed (seeds are seed0, seed0+1, …)")
    ap.add_argument("--budget", type=float, default=None, help="generated tokens per run (default 150000)")
    ap.add_argument("--checkpoints", type=int, default=5, help="EM evaluations per run after the start")
    ap.add_argument("--eval-size", type=int, default=None, help="held-out questions evaluated (default 100)")
    ap.add_argument("--max-steps", type=int, default=2000, help="safety cap on RL steps per run")
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="K=V", help="config override")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), help="run only these arms (default all)")
    ap.add_argument("--time-limit", type=float, default=0.0, help="start no new run after this many seconds")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON and the plot")
    args = ap.parse_args(argv)
    seeds_n = args.seeds if args.seeds is not None else (2 if args.quick else 3)
    budget = args.budget if args.budget is not None else (1500.0 if args.quick else 150_000.0)
    eval_size = args.eval_size if args.eval_size is not None else (8 if args.quick else 100)
    if seeds_n < 1:
        ap.error("--seeds must be >= 1")
    if budget <= 0:
        ap.error("--budget must be > 0")
    if args.checkpoints < 1:
        ap.error("--checkpoints must be >= 1")
    if eval_size < 1:
        ap.error("--eval-size must be >= 1")
    arms = args.arms or list(ARMS)
    sets = (QUICK_SETS if args.quick else []) + list(args.sets)
    try:
        return _run(args, arms, sets, seeds_n, budget, eval_size)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(
    args: argparse.Namespace, arms: list[str], sets: list[str], seeds_n: int, budget: float, eval_size: int
) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    base = load_config(None, sets, args.preset)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.json else (lambda s: None)
    parts = build_run(base, log=log)  # the one shared warm start (built once, or loaded from the cache)
    base_model = copy.deepcopy(parts.model)
    eval_rows = list(parts.eval_rows[:eval_size])
    if not eval_rows:
        raise UserError("data: no held-out rows to evaluate on")
    # Greedy EM of the warm start: the same for every run (greedy decoding, fixed rows).
    greedy = make_policy(copy.deepcopy(base_model), parts.tokenizer, base, greedy=True, seed=base.seed)
    start_em = evaluate(greedy, parts.env, eval_rows)["eval/em"]
    out_dir = Path(args.out)
    stem = "learning_quick" if args.quick else "learning"
    seeds = list(range(args.seed0, args.seed0 + seeds_n))
    setup = {
        "command": "python benchmarks/learning.py " + " ".join(sys.argv[1:]),
        "preset": args.preset,
        "overrides": sets,
        "budget": budget,
        "budget_count_for_stopping": "generated_tokens",
        "seeds": seeds,
        "checkpoints": args.checkpoints,
        "eval_size": len(eval_rows),
        "warm_start_em": start_em,
        "warm_start": {k: v for k, v in parts.warmstart.items() if k in ("cached", "params", "seconds")},
        "arm_overrides": {a: arm_overrides(a, base) for a in arms},
        "config": {
            k: base.to_dict()[k]
            for k in ("model", "policy", "env", "data", "trainer", "advantage", "rollout")
        },
        "torch_threads": torch.get_num_threads(),
        "notes": [],
    }
    if base.rollout.l == 1 and {"tree(2,2,1)", "tree(2,2,1) depth_stratified"} <= set(arms):
        setup["notes"].append(
            "with l=1 each tree is one chain when its points are drawn (one candidate per depth), so "
            "depth_stratified draws exactly like random: the two arms coincide; they differ only for l>1"
        )
    result: dict[str, Any] = {"setup": setup, "partial": True, "runs": [], "summary": {}}
    # Main pair first (all seeds), then the budget ablation pair, then the strategy ablation.
    order = [(a, s) for group in _run_order(arms) for s in seeds for a in group]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (arm, seed) in enumerate(order):
            if args.time_limit and time.perf_counter() - t_start > args.time_limit:
                log(f"time limit reached: {len(order) - i} runs not started")
                break
            cfg = load_config(
                None,
                [*sets, *arm_overrides(arm, base), f"seed={seed}", f"trainer.steps={args.max_steps}"],
                args.preset,
            )
            run = train_one(
                cfg,
                parts,
                base_model,
                eval_rows,
                start_em,
                budget,
                args.checkpoints,
                args.max_steps,
                Path(tmp) / f"run{i}",
            )
            run = {"arm": arm, "seed": seed, **run}
            result["runs"].append(run)
            log(
                f"[{i + 1}/{len(order)}] {arm} seed {seed}: EM {start_em:.3f} -> {run['final_em']:.3f} "
                f"in {run['steps']} steps, {run['seconds']:.0f} s"
            )
            result["summary"] = summarize(result["runs"], arms, args.checkpoints)
            result["seconds"] = time.perf_counter() - t_start
            _write(result, out_dir / f"{stem}.json")
    result["partial"] = len(result["runs"]) < len(order)
    result["summary"] = summarize(result["runs"], arms, args.checkpoints)
    result["seconds"] = time.perf_counter() - t_start
    result["plot"] = str(out_dir / f"{stem}.png")
    _write(result, out_dir / f"{stem}.json")
    if result["runs"]:
        plot(result, out_dir / f"{stem}.png")
    if args.json:
        print(json.dumps(result, default=_json_default))
    else:
        print(table(result))
    return 0


def _run_order(arms: list[str]) -> list[list[str]]:
    """Arms grouped so each pair runs seed by seed (tree and chain of one seed back to back)."""
    pairs = [["tree(2,2,1)", "chain(4)"], ["tree(1,2,1)", "chain(2)"]]
    pairs.append(["tree(2,2,1) fixed_depth=1", "tree(2,2,1) depth_stratified"])
    out = [[a for a in p if a in arms] for p in pairs]
    return [p for p in out if p]


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _write(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=_json_default))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
