"""Rollout budget: chain baselines vs Tree-GRPO (M, N, L) configs with a fixed-length scripted agent.

Every trajectory is 3 agent steps of 100 generated tokens with 50-token observations after the two
searches, on a 200-token prompt, so the numbers isolate what prefix sharing saves. Averages are per
prompt over many prompts (expansion points are random). Run: python benchmarks/budget.py [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from treegrpo.rollout import RolloutConfig, sample_forests
from treegrpo.scripted import ScriptedEnv, ScriptedPolicy

STEPS, STEP_TOKENS, OBS_TOKENS, PROMPT_TOKENS = 3, 100, 50, 200
FIELDS = (
    "trajectories",
    "generated_tokens",
    "prefill_tokens",
    "prefill_tokens_no_reuse",
    "observation_tokens",
    "tool_calls",
    "trained_tokens_unique",
    "trained_tokens_total",
)


def configs() -> dict[str, RolloutConfig]:
    out = {
        "chain(4)": RolloutConfig(strategy="chain", num_generations=4),
        "chain(2)": RolloutConfig(strategy="chain", num_generations=2),
    }
    for m, n, l in [(1, 2, 1), (2, 2, 1), (2, 6, 1), (4, 5, 1)]:  # noqa: E741
        out[f"tree({m},{n},{l})"] = RolloutConfig(m=m, n=n, l=l)
    # Not in the paper's table: the same (2,2,1) shape with the root excluded from the candidates.
    out["tree(2,2,1) no-root"] = RolloutConfig(m=2, n=2, l=1, include_root=False)
    return out


def measure(cfg: RolloutConfig, prompts: int, seed: int) -> dict[str, float]:
    policy = ScriptedPolicy(step_tokens=STEP_TOKENS, seed=seed)
    env = ScriptedEnv(steps=STEPS, obs_tokens=OBS_TOKENS, prompt_tokens=PROMPT_TOKENS, seed=seed)
    rows = [{"id": i} for i in range(prompts)]
    res = sample_forests(rows, [str(i) for i in range(prompts)], policy, env, cfg, rng=seed)
    out = {k: res.budget[k] / prompts for k in FIELDS}
    out["policy_calls"] = res.budget["policy_calls"]
    return out


def run(prompts: int, seed: int) -> dict[str, Any]:
    rows = {name: measure(cfg, prompts, seed) for name, cfg in configs().items()}
    base = rows["chain(4)"]
    chain_tokens = STEPS * STEP_TOKENS
    for r in rows.values():
        per_traj = r["generated_tokens"] / r["trajectories"]
        r["generated_tokens_per_trajectory_ratio_vs_chain"] = per_traj / (
            base["generated_tokens"] / base["trajectories"]
        )
        r["budget_in_chains"] = r["generated_tokens"] / chain_tokens  # the paper's "≈ kB" label
    return {
        "setup": {
            "prompts": prompts,
            "seed": seed,
            "steps": STEPS,
            "step_tokens": STEP_TOKENS,
            "observation_tokens": OBS_TOKENS,
            "prompt_tokens": PROMPT_TOKENS,
            "baseline": "chain(4)",
            "values": "means per prompt",
        },
        "configs": rows,
    }


def table(result: dict[str, Any]) -> str:
    cols = [
        ("trajectories", "traj"),
        ("generated_tokens", "gen"),
        ("budget_in_chains", "≈B"),
        ("prefill_tokens", "prefill"),
        ("prefill_tokens_no_reuse", "no-reuse"),
        ("tool_calls", "tools"),
        ("generated_tokens_per_trajectory_ratio_vs_chain", "gen/traj÷chain"),
    ]
    head = f"{'config':<20}" + "".join(f"{label:>15}" for _, label in cols)
    lines = [head, "-" * len(head)]
    for name, r in result["configs"].items():
        lines.append(f"{name:<20}" + "".join(f"{r[k]:>15.3f}" for k, _ in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--prompts", type=int, default=64, help="prompts to average over (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.prompts < 1:
        ap.error("--prompts must be >= 1")
    result = run(args.prompts, args.seed)
    if args.json:
        print(json.dumps(result, indent=None, sort_keys=False))
    else:
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
