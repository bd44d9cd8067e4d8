"""Is the supervision right at every depth? Per-step credit against Monte-Carlo ground truth.

    python benchmarks/credit.py [--json] [--quick] [--seeds 3] [--questions 8] [--k 16] [--out DIR]

For each seed, one set of questions; for each rollout strategy (at equal generation budget), forests
sampled by the current policy; for every generated step s, A*(s) = V(s) − V(parent) with V estimated
by `--k` extra rollouts of the same policy from the node's state (`treegrpo.credit`), and the credit
each estimator's loss gives the step. Metrics by step depth (0 = first step): spearman, pearson,
sign_agreement (|A*| > SE), wasted_share (|credit| on steps with A* within 2 SE of 0), snr. Seeds give
mean and spread (`sd`). Names: `random` = tree (2,2,1) random expansion with the `tree` estimator,
`random/<estimator>` the same forests under another estimator; `chain` = chain GRPO 4, `chain/rloo`.

Full mode: the quickstart tiny model, warm-started (cached under cache_dir) on synthetic-kb with
planted decisions: two-hop questions only, step 0 decides whether to search at all (a planted guess
mistake), step 1 is a non-decision (the second search; early stops are off), step 2 decides which of
two retrieved names to answer (a planted distractor mistake). `--quick`: a scripted choice task with
closed-form A* (`treegrpo.credit.toy`), same keys, a few seconds. Writes credit.json (credit_quick.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from treegrpo.credit import NODE_VALUE, ValueCache, aggregate, by_depth, mc_values, step_records, step_truth
from treegrpo.errors import UserError
from treegrpo.rewards import exact_match, extract_answer
from treegrpo.rollout import RolloutConfig, sample_forests
from treegrpo.tree import ActionKind, Forest

HERE = Path(__file__).resolve().parent
TREE_EXTRA = ("tree_intra", "tree_inter", "tree_2norm", "rloo", NODE_VALUE)

# name -> (rollout shape, estimators: first is the plain name, the others are "name/estimator").
# Budgets: chain(4) ≈ (2,2,1) ≈ (2,1,2) ≈ 4 chains' worth; (1,2,1) ≈ chain(2) ≈ 2.
STRATEGIES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "random": ({"strategy": "random", "m": 2, "n": 2, "l": 1}, ("tree", *TREE_EXTRA)),
    "chain": ({"strategy": "chain", "num_generations": 4}, ("grpo", "rloo")),
    "fixed_depth=0": ({"strategy": "fixed_depth", "fixed_depth": 0, "m": 2, "n": 2, "l": 1}, ("tree",)),
    "fixed_depth=1": ({"strategy": "fixed_depth", "fixed_depth": 1, "m": 2, "n": 2, "l": 1}, ("tree",)),
    "fixed_depth=2": ({"strategy": "fixed_depth", "fixed_depth": 2, "m": 2, "n": 2, "l": 1}, ("tree",)),
    "depth_stratified(L=2)": ({"strategy": "depth_stratified", "m": 2, "n": 1, "l": 2}, ("tree",)),
    "entropy": ({"strategy": "entropy", "m": 2, "n": 2, "l": 1}, ("tree",)),
    "tree(1,2,1)": ({"strategy": "random", "m": 1, "n": 2, "l": 1}, ("tree",)),
    "chain(2)": ({"strategy": "chain", "num_generations": 2}, ("grpo",)),
}
BUDGET_KEYS = ("generated_tokens", "trajectories", "sequences_generated", "tool_calls")
PLANTED_TASK = "{seed: 0, n_entities: 300, max_hops: 3, train_hops: 2, eval_hops: 2, guess_prob: 0.25, distractor_prob: 0.25}"


def entry_names() -> list[str]:
    return [n if i == 0 else f"{n}/{e}" for n, (_, ests) in STRATEGIES.items() for i, e in enumerate(ests)]


def _rollout_cfg(base: RolloutConfig, shape: dict[str, Any]) -> RolloutConfig:
    cfg = copy.deepcopy(base)
    for k, v in shape.items():
        setattr(cfg, k, v)
    return cfg


def mistake_rates(forests: Sequence[Forest], rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Planted-mistake rates of the sampled policy, from its chains (the first tree of each forest on).

    guess: answers at step 0; early_stop: answers after fewer searches than hops (not planted here);
    distractor: among answers given after all the searches, the share naming the distractor.
    """
    guess = early = dist = finals = n = 0
    for f, row in zip(forests, rows, strict=True):
        hops = len(row.get("path", [])) or 1
        for t in f.trees:
            n += 1
            leaf = t.leaves()[0]
            if leaf.action != ActionKind.ANSWER:
                continue
            guess += int(leaf.depth == 1)
            early += int(1 < leaf.depth <= hops)
            if leaf.depth > hops:
                finals += 1
                d = str(row.get("distractor", ""))
                dist += int(bool(d) and exact_match(extract_answer(leaf.text), [d]) == 1.0)
    return {
        "guess_at_step0": guess / max(n, 1),
        "early_stop": early / max(n, 1),
        "distractor_at_last_step": dist / max(finals, 1),
        "chains": n,
    }


def run_seed(
    seed: int,
    rows: list[dict[str, Any]],
    policy: Any,
    env: Any,
    base: RolloutConfig,
    k: int,
    steps: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, float]], dict[str, Any]]:
    """One seed: per entry name its by_depth table, per strategy its per-prompt budget, and stats.

    `steps`, when given, collects every step record (to recompute metrics without new rollouts).
    """
    cache = ValueCache()
    gids = [f"credit/s{seed}/{i}" for i in range(len(rows))]
    tables: dict[str, dict[str, Any]] = {}
    budgets: dict[str, dict[str, float]] = {}
    stats: dict[str, Any] = {}
    mc_cfg = _rollout_cfg(base, {"strategy": "chain"})
    for si, (name, (shape, ests)) in enumerate(STRATEGIES.items()):
        cfg = _rollout_cfg(base, shape)
        res = sample_forests(rows, gids, policy, env, cfg, rng=np.random.default_rng([seed, si]))
        values = mc_values(res.forests, policy, env, k, mc_cfg, cache)
        truth = step_truth(res.forests, values)
        for i, est in enumerate(ests):
            entry = name if i == 0 else f"{name}/{est}"
            recs = step_records(res.forests, truth, est)
            cols = ([r.depth for r in recs], [r.credit for r in recs], [r.a_star for r in recs])
            tables[entry] = by_depth(*cols, [r.se for r in recs])
            if steps is not None:
                steps.extend(
                    {
                        "seed": seed,
                        "entry": entry,
                        "depth": r.depth,
                        "credit": r.credit,
                        "a_star": r.a_star,
                        "se": r.se,
                    }
                    for r in recs
                )
        budgets[name] = {key: float(np.mean([p.get(key, 0) for p in res.per_prompt])) for key in BUDGET_KEYS}
        if name == "chain":
            stats["policy_mistake_rates"] = mistake_rates(res.forests, rows)
    stats["mc_generated_tokens"] = cache.generated_tokens
    return tables, budgets, stats


def _mean_budget(budgets: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {
        name: {key: float(np.mean([b[name][key] for b in budgets])) for key in BUDGET_KEYS}
        for name in budgets[0]
    }


def quick_parts(seed: int, questions: int) -> tuple[list[dict[str, Any]], Any, Any, RolloutConfig, dict]:
    from treegrpo.credit.toy import ChoiceEnv, ChoicePolicy

    p_good, weights = (0.7, 0.9, 0.7), (1.0, 0.0, 1.0)
    rows = [{"id": seed * 1000 + i} for i in range(questions)]
    setup = {"task": "toy choice (closed-form A*)", "p_good": p_good, "weights": weights}
    return rows, ChoicePolicy(p_good, seed=seed), ChoiceEnv(weights), RolloutConfig(), setup


class FullParts:
    """The warm-started quickstart model on the planted synthetic-kb variant, built (or loaded) once."""

    def __init__(self, preset: str, sets: Sequence[str]) -> None:
        from treegrpo.build import build_run
        from treegrpo.config import load_config
        from treegrpo.policy_factory import make_policy

        self.preset = preset
        self.overrides = [f"data.task_kwargs={PLANTED_TASK}", "warmstart.early_stop_prob=0.0", *sets]
        self.cfg = load_config(None, self.overrides, preset)
        self.parts = build_run(self.cfg, log=lambda s: print(s, file=sys.stderr))
        self.make_policy = make_policy
        base = copy.deepcopy(self.cfg.rollout)
        base.max_context_tokens = int(getattr(self.parts.model.config, "max_position_embeddings", 4096))
        self.base = base

    def seed_parts(self, seed: int, questions: int) -> tuple[list[dict[str, Any]], Any, Any, RolloutConfig]:
        order = np.random.default_rng([seed, 1313]).permutation(len(self.parts.train_rows))
        rows = [self.parts.train_rows[int(i)] for i in order[:questions]]
        policy = self.make_policy(
            self.parts.model, self.parts.tokenizer, self.cfg, greedy=False, seed=seed, training=False
        )
        return rows, policy, self.parts.env, self.base


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ap.add_argument("--quick", action="store_true", help="scripted toy task, seconds (numbers are the toy's)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default 3; quick 2)")
    ap.add_argument("--questions", type=int, default=None, help="questions per seed (default 8; quick 40)")
    ap.add_argument("--k", type=int, default=None, help="extra rollouts per node (default 16; quick 16)")
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--save-steps", help="also write every step record (depth, credit, A*, SE) as JSON here")
    args = ap.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 3)
    questions = args.questions if args.questions is not None else (40 if args.quick else 8)
    k = args.k if args.k is not None else 16
    if seeds < 1 or questions < 1 or k < 2:
        raise UserError(f"need --seeds >= 1, --questions >= 1, --k >= 2; got {seeds}, {questions}, {k}")
    t0 = time.perf_counter()
    full = None if args.quick else FullParts(args.preset, args.sets)
    per_seed: list[tuple[dict, dict, dict]] = []
    steps: list[dict[str, Any]] | None = [] if args.save_steps else None
    setup: dict[str, Any] = {}
    for seed in range(seeds):
        if full is None:
            rows, policy, env, base, setup = quick_parts(seed, questions)
        else:
            rows, policy, env, base = full.seed_parts(seed, questions)
            setup = {
                "task": "synthetic-kb planted decisions",
                "task_kwargs": PLANTED_TASK,
                "decisions": {"0": "search or guess", "1": "none (second search)", "2": "gold or distractor"},
                "model": f"{args.preset} tiny model, warm start {full.parts.warmstart.get('params', '')} params",
                "temperature": full.cfg.policy.temperature,
            }
        per_seed.append(run_seed(seed, rows, policy, env, base, k, steps))
        print(f"seed {seed} done at {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    names = entry_names()
    budgets = _mean_budget([b for _, b, _ in per_seed])
    strategies = {
        name: {
            "budget": budgets[name.split("/")[0]],
            "by_depth": aggregate([t[name] for t, _, _ in per_seed]),
        }
        for name in names
    }
    setup.update(
        {
            "mode": "quick" if args.quick else "full",
            "seeds": seeds,
            "questions_per_seed": questions,
            "k": k,
            "loss_agg_mode": "token-mean",
            "sign_threshold_se": 1.0,
            "min_steps_for_correlation": 3,
            "zero_threshold_se": 2.0,
            "per_seed_stats": [s for _, _, s in per_seed],
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    result = {"setup": setup, "strategies": strategies}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("credit_quick.json" if args.quick else "credit.json")).write_text(json.dumps(result, indent=2))
    if args.save_steps:
        Path(args.save_steps).write_text(json.dumps(steps))
    if args.json:
        print(json.dumps(result))
    else:
        for name in ("random", "chain", "fixed_depth=0", "fixed_depth=2", "depth_stratified(L=2)"):
            row = strategies[name]["by_depth"]
            cells = [f"d{d}: r={_f(m['spearman'])} sign={_f(m['sign_agreement'])}" for d, m in row.items()]
            print(f"{name:24s} " + "  ".join(cells))
    return 0


def _f(v: float | None) -> str:
    return "  -  " if v is None else f"{v:+.2f}"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
