"""Supervision granularity: at which depths do sampled trees split, and how much signal do splits make?

Tree-GRPO's claim (SPEC §1, §5) is that random expansion yields supervision at many granularities at
once: a split at the root compares whole strategies (coarse), a split deep down compares one detail
(fine). This module measures that on finished forests. It is pure: trees in, numbers out.

Definitions (V = mean leaf reward of a subtree, n = number of leaves in it; depth: root = 0):

- **Branch point**: a node with two or more children. Its depth is the node's depth, so a branch at
  depth d means the siblings share d agent steps and differ from step d+1 on.
- **Spread** at a branch point p with children c_i: max_i V(c_i) − min_i V(c_i).
- **Signal** at p: ``S(p) = Σ_i n_i · |V(c_i) − V(p)|`` (reward units).

Why this signal: with the intra-tree z-score A(l) = (R_l − V(root)) / σ, the credit a node's tokens
receive when each leaf is trained as its own sequence is the sum over the leaves below it,
C(x) = n_x (V(x) − V(root)) / σ. A child that merely inherited its share of the parent's credit
would get (n_i / n_p) C(p); the difference C(c_i) − (n_i / n_p) C(p) = n_i (V(c_i) − V(p)) / σ is
exactly the credit *created* by the split at p. So S(p)/σ is the total absolute credit redistributed
among siblings at p, and S(p) is it in reward units. A node with one child has V(child) = V(node), so
signal arises only at branch points — at whatever depth they sit. Reward units (not divided by the
tree's σ) keep trees comparable, stay defined for one-leaf trees, and do not inflate tiny reward
differences; within one tree the depth shares are identical either way. For two single-leaf siblings
S = |R_1 − R_2|; in general S = 2·Σ_i n_i·max(0, V(c_i) − V(p)), since the terms sum to zero.

- **Signal share by depth**: Σ S(p) over branch points at depth d, divided by Σ S(p) over all branch
  points (0 everywhere when there is no signal, e.g. chains or all-equal rewards — never NaN).
- **Inter-tree signal** (reported separately, not part of the shares): the same formula one level up,
  with the forest as parent and its trees as children: Σ_t n_t |V(t) − V(forest)|. It is what chain
  GRPO relies on exclusively.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from treegrpo.advantage import node_value_advantages
from treegrpo.tree import Forest, Tree

PREFIX = "granularity/"


@dataclass(frozen=True)
class BranchStat:
    """One branch point of one tree."""

    group_id: str
    tree_index: int
    node_id: int
    depth: int
    leaves: int  # leaves below the branch point
    value: float  # V(p)
    child_values: tuple[float, ...]  # V(c_i), in child order
    child_leaves: tuple[int, ...]  # n_i, in child order
    spread: float  # max V(c_i) - min V(c_i)
    signal: float  # Σ n_i |V(c_i) - V(p)|


def tree_values(tree: Tree) -> tuple[np.ndarray, np.ndarray]:
    """(V, n) per node id: mean leaf reward of each subtree and its leaf count.

    Raises ValueError naming the tree and node if a leaf has no (finite) reward.
    """
    nv = node_value_advantages(tree)
    return nv["value"], nv["leaves"].astype(np.int64)


def branch_stats(tree: Tree) -> list[BranchStat]:
    """Spread and signal at every branch point of a finished tree, in node order."""
    value, count = tree_values(tree)
    out: list[BranchStat] = []
    for node in tree.nodes:
        if len(node.children) < 2:
            continue
        vp = float(value[node.id])
        cv = tuple(float(value[c]) for c in node.children)
        cn = tuple(int(count[c]) for c in node.children)
        signal = math.fsum(n * abs(v - vp) for v, n in zip(cv, cn, strict=True))
        out.append(
            BranchStat(
                group_id=tree.group_id,
                tree_index=tree.tree_index,
                node_id=node.id,
                depth=node.depth,
                leaves=int(count[node.id]),
                value=vp,
                child_values=cv,
                child_leaves=cn,
                spread=max(cv) - min(cv),
                signal=signal,
            )
        )
    return out


def inter_tree_signal(forest: Forest) -> float:
    """Σ_t n_t |V(t) − V(forest)| over the forest's trees: the signal between trees (0 for one tree)."""
    vals: list[tuple[float, int]] = []
    for t in forest.trees:
        v, n = tree_values(t)
        vals.append((float(v[0]), int(n[0])))
    total = sum(n for _, n in vals)
    if total == 0:
        return 0.0
    mean = math.fsum(v * n for v, n in vals) / total
    return math.fsum(n * abs(v - mean) for v, n in vals)


def _as_trees(forests: Iterable[Forest | Tree]) -> tuple[list[Tree], list[Forest]]:
    trees: list[Tree] = []
    fs: list[Forest] = []
    for f in forests:
        if isinstance(f, Tree):
            trees.append(f)
            fs.append(Forest(f.group_id, [f]))
        elif isinstance(f, Forest):
            trees.extend(f.trees)
            fs.append(f)
        else:
            raise ValueError(f"granularity expects Forest or Tree objects, got {type(f).__name__}")
    return trees, fs


def granularity_metrics(forests: Iterable[Forest | Tree]) -> dict[str, float]:
    """Flat `granularity/*` metrics of one batch of finished forests (one training step).

    Per-depth keys (`branch_depth_hist/d{d}`, `signal_share/d{d}`, `signal/d{d}`, `spread_mean/d{d}`)
    are emitted for every depth 0..D where D is the deepest non-leaf node in the batch (every depth a
    branch could have been made at), so a chain batch still logs zeros there. Keys:

    - `branch_points`, `branch_points_per_tree`, `informative_branch_points` (spread > 0)
    - `mean_branch_depth`, `max_branch_depth` (both 0 when there are no branch points)
    - `branch_depth_hist/d{d}`: count of branch points at depth d
    - `signal_total`, `signal_per_tree`, `signal/d{d}`, `signal_share/d{d}`, `signal_mean_depth`
      (signal-weighted mean depth: where supervision actually comes from)
    - `spread_mean`, `spread_mean/d{d}`: mean children-value spread at branch points
    - `inter_signal_total`: between-tree signal (not included in the shares)
    - `trees`, `leaves`, `mean_leaf_depth`
    """
    trees, fs = _as_trees(forests)
    stats: list[BranchStat] = []
    for t in trees:
        stats.extend(branch_stats(t))
    inter = math.fsum(inter_tree_signal(f) for f in fs if len(f.trees) > 1)

    internal_depths = [n.depth for t in trees for n in t.nodes if not n.is_leaf]
    leaf_depths = [n.depth for t in trees for n in t.nodes if n.is_leaf]
    max_d = max([*internal_depths, *(s.depth for s in stats)], default=0)

    hist = [0] * (max_d + 1)
    sig = [0.0] * (max_d + 1)
    spread_sum = [0.0] * (max_d + 1)
    for s in stats:
        hist[s.depth] += 1
        sig[s.depth] += s.signal
        spread_sum[s.depth] += s.spread
    total = math.fsum(sig)
    n_bp = len(stats)
    n_trees = len(trees)

    m: dict[str, float] = {
        "trees": float(n_trees),
        "leaves": float(len(leaf_depths)),
        "mean_leaf_depth": float(np.mean(leaf_depths)) if leaf_depths else 0.0,
        "branch_points": float(n_bp),
        "branch_points_per_tree": n_bp / n_trees if n_trees else 0.0,
        "informative_branch_points": float(sum(1 for s in stats if s.spread > 0)),
        "mean_branch_depth": math.fsum(s.depth for s in stats) / n_bp if n_bp else 0.0,
        "max_branch_depth": float(max((s.depth for s in stats), default=0)),
        "signal_total": total,
        "signal_per_tree": total / n_trees if n_trees else 0.0,
        "signal_mean_depth": math.fsum(d * x for d, x in enumerate(sig)) / total if total > 0 else 0.0,
        "spread_mean": math.fsum(s.spread for s in stats) / n_bp if n_bp else 0.0,
        "inter_signal_total": inter,
    }
    for d in range(max_d + 1):
        m[f"branch_depth_hist/d{d}"] = float(hist[d])
        m[f"signal/d{d}"] = sig[d]
        m[f"signal_share/d{d}"] = sig[d] / total if total > 0 else 0.0
        m[f"spread_mean/d{d}"] = spread_sum[d] / hist[d] if hist[d] else 0.0
    return {PREFIX + k: float(v) for k, v in m.items()}


def per_depth(row: Mapping[str, object], name: str) -> dict[int, float]:
    """{depth: value} of the `granularity/{name}/d{d}` keys in one metrics row (missing/None skipped)."""
    head = f"{PREFIX}{name}/d"
    out: dict[int, float] = {}
    for k, v in row.items():
        if k.startswith(head) and k[len(head) :].isdigit() and isinstance(v, int | float):
            out[int(k[len(head) :])] = float(v)
    return dict(sorted(out.items()))


def summarize_run(metrics_rows: Sequence[Mapping[str, object]]) -> dict[str, float]:
    """Whole-run granularity summary from metrics rows that carry `granularity/*` keys.

    Counts are summed over steps; shares are signal-weighted over the whole run (Σ_steps signal at
    depth d / Σ_steps total signal), so a step with no signal does not dilute them. Rows without
    granularity keys (e.g. the step-0 eval row) are ignored. Returns flat `granularity/run/*` keys;
    an empty dict when no row has granularity keys.
    """
    rows = [r for r in metrics_rows if isinstance(r.get(PREFIX + "branch_points"), int | float)]
    if not rows:
        return {}
    hist: dict[int, float] = {}
    sig: dict[int, float] = {}
    spread_w: dict[int, float] = {}
    for r in rows:
        h = per_depth(r, "branch_depth_hist")
        s = per_depth(r, "signal")
        if not s:  # older rows with only shares: rebuild absolute signal from share × total
            tot = float(r.get(PREFIX + "signal_total") or 0.0)  # type: ignore[arg-type]
            s = {d: x * tot for d, x in per_depth(r, "signal_share").items()}
        sp = per_depth(r, "spread_mean")
        for d, x in h.items():
            hist[d] = hist.get(d, 0.0) + x
            spread_w[d] = spread_w.get(d, 0.0) + x * sp.get(d, 0.0)
        for d, x in s.items():
            sig[d] = sig.get(d, 0.0) + x

    def tot(key: str) -> float:
        return math.fsum(float(r.get(PREFIX + key) or 0.0) for r in rows)  # type: ignore[arg-type]

    n_bp = math.fsum(hist.values())
    total = math.fsum(sig.values())
    trees = tot("trees")
    out: dict[str, float] = {
        "steps": float(len(rows)),
        "branch_points": n_bp,
        "branch_points_per_step": n_bp / len(rows),
        "branch_points_per_tree": n_bp / trees if trees else 0.0,
        "informative_fraction": tot("informative_branch_points") / n_bp if n_bp else 0.0,
        "mean_branch_depth": math.fsum(d * x for d, x in hist.items()) / n_bp if n_bp else 0.0,
        "signal_total": total,
        "signal_per_step": total / len(rows),
        "signal_per_tree": total / trees if trees else 0.0,
        "signal_mean_depth": math.fsum(d * x for d, x in sig.items()) / total if total > 0 else 0.0,
        "spread_mean": math.fsum(spread_w.values()) / n_bp if n_bp else 0.0,
        "inter_signal_total": tot("inter_signal_total"),
        "depths_with_signal": float(sum(1 for x in sig.values() if x > 0)),
    }
    for d in sorted(set(hist) | set(sig)):
        out[f"branch_depth_hist/d{d}"] = hist.get(d, 0.0)
        out[f"branch_depth_frac/d{d}"] = hist.get(d, 0.0) / n_bp if n_bp else 0.0
        out[f"signal_share/d{d}"] = sig.get(d, 0.0) / total if total > 0 else 0.0
    return {f"{PREFIX}run/{k}": float(v) for k, v in out.items()}


__all__ = [
    "BranchStat",
    "branch_stats",
    "granularity_metrics",
    "inter_tree_signal",
    "per_depth",
    "summarize_run",
    "tree_values",
]
