"""How well per-step credit matches the Monte-Carlo truth A*, by depth of the step.

All metrics are invariant to a positive rescaling of the credit (the loss normaliser does not matter)
and return None, never NaN or a crash, when they are undefined (too few steps, constant values).

- spearman / pearson: rank and linear correlation of credit with A*;
- sign_agreement: on steps whose |A*| exceeds `z_sign` (1) standard errors and whose credit is not 0,
  the share whose credit has A*'s sign (is the supervision that is given right?);
- signed_share: the share of those significant steps that get any credit at all (a group whose rewards
  all tie gives 0; a credit below 1e-9 of the largest is rounding and counts as 0);
- wasted_share: the share of Σ|credit| spent on steps whose A* is indistinguishable from 0: within
  `z_zero` (2, about 95%) standard errors of it (A* = 0 with SE = 0 included);
- snr: energy of the credit along A* over the energy orthogonal to it, c = βa + e:
  (c·a)²/(a·a) ÷ (c·c − (c·a)²/(a·a)), uncentred, because a constant offset in credit is not signal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

METRICS = ("n_steps", "spearman", "pearson", "sign_agreement", "signed_share", "wasted_share", "snr")
MIN_STEPS = 3  # correlations and snr of one or two steps are trivially ±1 / parallel: reported as None
SNR_CAP = 1e6  # a credit exactly proportional to A* has infinite snr; JSON has no infinity


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(x.size, dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


def pearson(x: ArrayLike, y: ArrayLike) -> float | None:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size < 2:
        return None
    da, db = a - a.mean(), b - b.mean()
    den = float(np.sqrt((da * da).sum() * (db * db).sum()))
    scale = max(float(np.abs(a).max()), 1e-300) * max(float(np.abs(b).max()), 1e-300)
    if den <= 1e-12 * scale * a.size:  # a constant side (up to rounding): undefined
        return None
    return float(np.clip((da * db).sum() / den, -1.0, 1.0))


def spearman(x: ArrayLike, y: ArrayLike) -> float | None:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size < 2:
        return None
    return pearson(_ranks(a), _ranks(b))


def depth_metrics(
    credit: ArrayLike, a_star: ArrayLike, se: ArrayLike, z_sign: float = 1.0, z_zero: float = 2.0
) -> dict[str, Any]:
    """The metrics of one set of steps (e.g. all steps at one depth)."""
    c = np.asarray(credit, dtype=np.float64)
    a = np.asarray(a_star, dtype=np.float64)
    s = np.asarray(se, dtype=np.float64)
    if not c.shape == a.shape == s.shape:
        raise ValueError(f"credit, a_star and se must have one shape, got {c.shape}, {a.shape}, {s.shape}")
    real = (np.abs(a) > z_sign * s) & (a != 0.0)
    zero = (np.abs(a) <= z_zero * s) | (a == 0.0)
    enough = c.size >= MIN_STEPS
    out: dict[str, Any] = {
        "n_steps": int(c.size),
        "spearman": spearman(c, a) if enough else None,
        "pearson": pearson(c, a) if enough else None,
    }
    given = np.abs(c) > 1e-9 * float(np.abs(c).max()) if c.size else np.zeros(0, dtype=bool)
    judged = real & given
    out["sign_agreement"] = float((np.sign(c[judged]) == np.sign(a[judged])).mean()) if judged.any() else None
    out["signed_share"] = float(given[real].mean()) if real.any() else None
    total = float(np.abs(c).sum())
    out["wasted_share"] = float(np.abs(c[zero]).sum() / total) if total > 0 else None
    aa, cc = float(a @ a), float(c @ c)
    if enough and aa > 0 and cc > 0:
        along = float(c @ a) ** 2 / aa
        noise = max(cc - along, 0.0)
        out["snr"] = float(min(along / noise, SNR_CAP)) if noise > 1e-12 * cc else SNR_CAP
    else:
        out["snr"] = None
    return out


def by_depth(
    depths: Sequence[int],
    credit: ArrayLike,
    a_star: ArrayLike,
    se: ArrayLike,
    z_sign: float = 1.0,
    z_zero: float = 2.0,
) -> dict[str, dict[str, Any]]:
    """`depth_metrics` per step depth, keyed "0", "1", ... (JSON keys)."""
    d = np.asarray(depths, dtype=np.int64)
    c, a, s = (np.asarray(v, dtype=np.float64) for v in (credit, a_star, se))
    return {
        str(k): depth_metrics(c[d == k], a[d == k], s[d == k], z_sign, z_zero)
        for k in sorted(set(d.tolist()))
    }


def aggregate(runs: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and spread (sample sd) over seeds of per-seed `by_depth` tables; None values are skipped.

    `n_steps` is the total over seeds; each depth also carries `sd` (per metric) and `seeds` (how many
    seeds had a defined value, per metric).
    """
    depths = sorted({k for r in runs for k in r}, key=int)
    out: dict[str, dict[str, Any]] = {}
    for k in depths:
        rows = [r[k] for r in runs if k in r]
        entry: dict[str, Any] = {"n_steps": int(sum(r["n_steps"] for r in rows))}
        sd: dict[str, float | None] = {}
        seeds: dict[str, int] = {}
        for m in METRICS[1:]:
            vals = [float(r[m]) for r in rows if r.get(m) is not None]
            entry[m] = float(np.mean(vals)) if vals else None
            sd[m] = float(np.std(vals, ddof=1)) if len(vals) >= 2 else None
            seeds[m] = len(vals)
        entry["sd"] = sd
        entry["seeds"] = seeds
        out[k] = entry
    return out
