"""The edge layer of credit measurement: `treegrpo credit RUN_DIR` and the report's credit section.

`credit_cli` loads a run's config and latest checkpoint, samples forests with the run's own rollout
strategy and estimator, measures per-step credit against Monte-Carlo A* (`--k` extra rollouts per
node) and writes RUN_DIR/credit.json in the benchmark's schema. `treegrpo report` reads that file.
"""

from __future__ import annotations

import copy
import html
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from treegrpo.credit.measure import credit_by_depth
from treegrpo.credit.metrics import METRICS, aggregate
from treegrpo.credit.truth import ValueCache, mc_values, step_truth
from treegrpo.errors import UserError

CREDIT_FILE = "credit.json"


def credit_cli(run_dir: str, k: int = 16, prompts: int = 8, seed: int = 0) -> int:
    """Measure credit quality by depth for a run's latest checkpoint; write RUN_DIR/credit.json."""
    from treegrpo.build import build_run
    from treegrpo.checkpoint import latest_checkpoint, load_weights
    from treegrpo.config import load_config
    from treegrpo.policy_factory import make_policy
    from treegrpo.rollout import sample_forests

    root = Path(run_dir)
    if not (root / "config.yaml").is_file():
        raise UserError(f"{root}: not a treegrpo run directory (no config.yaml)")
    if k < 2:
        raise UserError(f"--k: need at least 2 rollouts per node for a standard error, got {k}")
    if prompts < 1:
        raise UserError(f"--prompts: must be >= 1, got {prompts}")
    t0 = time.perf_counter()
    cfg = load_config(root / "config.yaml")
    parts = build_run(cfg, log=lambda s: None)
    ckpt = latest_checkpoint(root / "checkpoints")
    if ckpt is not None:
        load_weights(parts.model, ckpt)
    policy = make_policy(parts.model, parts.tokenizer, cfg, greedy=False, seed=seed)
    rcfg = copy.deepcopy(cfg.rollout)
    if rcfg.max_context_tokens is None:
        rcfg.max_context_tokens = int(getattr(parts.model.config, "max_position_embeddings", 4096))
    order = np.random.default_rng([seed, 1313]).permutation(len(parts.train_rows))[:prompts]
    rows = [parts.train_rows[int(i)] for i in order]
    gids = [f"credit/{i}" for i in range(len(rows))]
    res = sample_forests(rows, gids, policy, parts.env, rcfg, rng=np.random.default_rng(seed))
    mc_cfg = copy.deepcopy(rcfg)
    mc_cfg.strategy = "chain"
    values = mc_values(res.forests, policy, parts.env, k, mc_cfg, ValueCache())
    truth = step_truth(res.forests, values)
    estimator = cfg.advantage.estimator
    tables = credit_by_depth(res.forests, truth, [estimator], cfg.trainer.loss_agg_mode)
    budget = {key: float(np.mean([p.get(key, 0) for p in res.per_prompt])) for key in ("generated_tokens",)}
    name = f"{rcfg.strategy}/{estimator}"
    result = {
        "setup": {
            "run_dir": str(root),
            "checkpoint": str(ckpt) if ckpt else None,
            "k": k,
            "prompts": len(rows),
            "seed": seed,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "strategies": {name: {"budget": budget, "by_depth": aggregate([tables[estimator]])}},
    }
    (root / CREDIT_FILE).write_text(json.dumps(result, indent=2))
    print("\n".join(credit_text(result)))
    print(f"credit: {root / CREDIT_FILE}")
    return 0


def load_credit(run_dir: str | Path) -> dict[str, Any] | None:
    """RUN_DIR/credit.json, or None when absent or unreadable (the report says so, never crashes)."""
    path = Path(run_dir) / CREDIT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("strategies"), dict):
        return None
    return data


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{float(v):.2f}"


def _rows(data: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for name, entry in data.get("strategies", {}).items():
        for depth, m in (entry.get("by_depth") or {}).items():
            if isinstance(m, dict):
                out.append((str(name), str(depth), m))
    return out


def credit_text(data: Mapping[str, Any]) -> list[str]:
    """The credit-quality-by-depth table as text lines."""
    setup = data.get("setup", {})
    lines = [f"-- credit quality by depth (K={setup.get('k', '?')} extra rollouts per node) --"]
    lines.append("  " + f"{'strategy/estimator':24s} depth " + " ".join(f"{m:>14s}" for m in METRICS))
    for name, depth, m in _rows(data):
        lines.append(f"  {name:24s} {depth:>5s} " + " ".join(f"{_cell(m.get(k)):>14s}" for k in METRICS))
    return lines


def credit_html(data: Mapping[str, Any] | None) -> str:
    """The report section (heading included); says how to produce it when the run has no credit.json."""
    head = "<h2>Credit quality by depth</h2>"
    if data is None:
        return head + (
            "<p class='muted'>no credit.json in this run: <code>treegrpo credit RUN_DIR --k 16</code> "
            "measures each step's credit against Monte-Carlo ground truth from the latest checkpoint.</p>"
        )
    setup = data.get("setup", {})
    note = (
        "<p class='muted'>Credit = what the loss gives a step's tokens (Σ of w·A over the leaves below it); "
        "ground truth A*(s) = V(s) − V(parent), V from "
        f"{html.escape(str(setup.get('k', '?')))} extra rollouts of the policy per node. sign agreement on "
        "steps with |A*| &gt; SE; wasted share = |credit| on steps with A* within 2 SE of 0.</p>"
    )
    cells = "".join(f"<th>{html.escape(m)}</th>" for m in METRICS)
    body = [f"<table><tr><th>strategy/estimator</th><th>depth</th>{cells}</tr>"]
    for name, depth, m in _rows(data):
        tds = "".join(f"<td>{_cell(m.get(k))}</td>" for k in METRICS)
        body.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(depth)}</td>{tds}</tr>")
    body.append("</table>")
    return head + note + "".join(body)
