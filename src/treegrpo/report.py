"""`treegrpo report RUN_DIR`: one self-contained HTML page and a plain-text summary of a training run.

The page must open anywhere, offline and years later, so everything is inline: plots are matplotlib
PNGs embedded as base64, CSS and the tree viewer's small script are in the page, and the trees it
shows travel as JSON inside a non-executable `<script type="application/json">` block. Model text
is untrusted: the server side escapes everything it writes with `html.escape`, the JSON block has
`<`, `>` and `&` escaped, and the viewer inserts text only through `textContent`, never as HTML.

A run directory holds config.yaml, metrics.jsonl, trees/step-NNNNNN.jsonl and summary.json; any of
them may be missing (a run without eval, without saved trees, or killed early) and the report says so
instead of failing. Granularity curves come from the metrics' `granularity/*` keys when the trainer
logged them, otherwise they are recomputed from the saved trees.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treegrpo.credit.report import credit_html, credit_text, load_credit
from treegrpo.diagnostics import LABELS as DIAGNOSTIC_LABELS
from treegrpo.errors import UserError
from treegrpo.granularity import (
    PREFIX,
    branch_stats,
    granularity_metrics,
    per_depth,
    summarize_run,
    tree_values,
)
from treegrpo.tree import Forest, Tree, group_forests, read_jsonl

TREE_FILE = re.compile(r"^step-(\d+)\.jsonl$")
MAX_TEXT = 1200  # characters of a step's text kept in the viewer
MAX_OBS = 400  # characters of an observation kept in the viewer


@dataclass
class RunData:
    """Everything the report reads from a run directory (trees are loaded lazily, per step)."""

    run_dir: Path
    config_text: str = ""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    tree_files: dict[int, Path] = field(default_factory=dict)  # step -> trees/step-N.jsonl
    warnings: list[str] = field(default_factory=list)
    gran: tuple[list[dict[str, Any]], str] | None = None  # cache of granularity_rows()


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory. Raises UserError if it does not exist or holds nothing a run writes."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UserError(f"run directory {root} does not exist")
    run = RunData(root)
    cfg = root / "config.yaml"
    if cfg.is_file():
        run.config_text = cfg.read_text(encoding="utf-8", errors="replace")
    mpath = root / "metrics.jsonl"
    if mpath.is_file():
        bad = 0
        for ln in mpath.read_text(encoding="utf-8", errors="replace").splitlines():
            if not ln.strip():
                continue
            try:
                row = json.loads(ln)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                run.metrics.append(row)
            else:
                bad += 1
        if bad:
            run.warnings.append(f"metrics.jsonl: skipped {bad} unreadable line(s)")
    spath = root / "summary.json"
    if spath.is_file():
        try:
            data = json.loads(spath.read_text(encoding="utf-8"))
            run.summary = data if isinstance(data, dict) else {}
        except ValueError:
            run.warnings.append("summary.json is not valid JSON; ignored")
    tdir = root / "trees"
    if tdir.is_dir():
        for p in tdir.iterdir():
            m = TREE_FILE.match(p.name)
            if m and p.is_file():
                run.tree_files[int(m.group(1))] = p
        run.tree_files = dict(sorted(run.tree_files.items()))
    if not (run.config_text or run.metrics or run.summary or run.tree_files):
        raise UserError(
            f"{root} is not a treegrpo run directory (no config.yaml, metrics.jsonl, summary.json or trees/)"
        )
    return run


def load_forests(run: RunData, step: int) -> list[Forest]:
    """The forests saved at `step` (UserError with the file name if it cannot be parsed)."""
    path = run.tree_files[step]
    try:
        return group_forests(read_jsonl(path))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: cannot read trees ({type(e).__name__}: {e})") from e


def granularity_rows(run: RunData) -> tuple[list[dict[str, Any]], str]:
    """Per-step granularity metrics and where they came from ("metrics", "trees" or "none")."""
    if run.gran is not None:
        return run.gran
    run.gran = _granularity_rows(run)
    return run.gran


def _granularity_rows(run: RunData) -> tuple[list[dict[str, Any]], str]:
    rows = [r for r in run.metrics if isinstance(r.get(PREFIX + "branch_points"), int | float)]
    if rows:
        return rows, "metrics"
    out: list[dict[str, Any]] = []
    for step in run.tree_files:
        try:
            out.append({"step": step, **granularity_metrics(load_forests(run, step))})
        except (UserError, ValueError) as e:
            run.warnings.append(f"granularity of step {step} skipped: {e}")
    return out, ("trees" if out else "none")


# ----------------------------------------------------------------------------- series helpers


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def series(rows: Sequence[Mapping[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(xs, ys) of the rows where both `x` and `key` are finite numbers."""
    xs: list[float] = []
    ys: list[float] = []
    for r in rows:
        a, b = _num(r.get(x)), _num(r.get(key))
        if a is not None and b is not None:
            xs.append(a)
            ys.append(b)
    return xs, ys


def eval_curve(rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, float, float]]:
    """(step, cumulative generated tokens, eval EM) for every evaluated step.

    An eval row without its own cumulative count uses the latest one logged before it (0 at start).
    """
    cum = 0.0
    out: list[tuple[int, float, float]] = []
    for r in sorted(rows, key=lambda r: r["step"]):
        c = _num(r.get("budget/cum_generated_tokens"))
        if c is not None:
            cum = c
        em = _num(r.get("eval/em"))
        if em is not None:
            out.append((int(r["step"]), cum, em))
    return out


# ----------------------------------------------------------------------------- plots


def _fig_b64(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(ncols: int, width: float = 4.2, height: float = 3.0) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed

    fig = Figure(figsize=(width * ncols, height))
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.set_layout_engine("tight")
    return fig, axes


def _empty(ax: Any, msg: str) -> None:
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, color="#777")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_learning(rows: Sequence[Mapping[str, Any]]) -> str:
    fig, (a, b) = _figure(2)
    xs, ys = series(rows, "train/reward_mean")
    if xs:
        a.plot(xs, ys, marker=".", label="train reward (mean)")
        sx, sd = series(rows, "train/reward_std")
        if sx == xs:
            a.fill_between(
                xs,
                [y - s for y, s in zip(ys, sd, strict=True)],
                [y + s for y, s in zip(ys, sd, strict=True)],
                alpha=0.15,
            )
        ex, ey = series(rows, "train/em")
        if ex:
            a.plot(ex, ey, marker=".", label="train EM")
        a.set_xlabel("step")
        a.set_title("training reward")
        a.legend(fontsize=8)
    else:
        _empty(a, "no training steps logged")
    ev = eval_curve(rows)
    if ev:
        b.plot([c for _, c, _ in ev], [e for _, _, e in ev], marker="o")
        b.set_xlabel("cumulative generated tokens")
        b.set_ylabel("EM")
        b.set_title("held-out EM vs generation budget")
    else:
        _empty(b, "no evaluation in this run")
    return _fig_b64(fig)


BUDGET_KEYS = [
    ("budget/generated_tokens", "generated tokens"),
    ("budget/prefill_tokens", "prefill tokens"),
    ("budget/tool_calls", "tool calls"),
    ("budget/trajectories", "trajectories"),
    ("time/step_seconds", "seconds per step"),
]


def plot_budget(rows: Sequence[Mapping[str, Any]]) -> str | None:
    present = [(k, label) for k, label in BUDGET_KEYS if series(rows, k)[0]]
    if not present:
        return None
    fig, axes = _figure(len(present), width=3.2, height=2.6)
    for ax, (k, label) in zip(axes, present, strict=True):
        xs, ys = series(rows, k)
        ax.plot(xs, ys, marker=".")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(bottom=0)
    return _fig_b64(fig)


def plot_granularity(grows: Sequence[Mapping[str, Any]], summary: Mapping[str, float]) -> str:
    fig, (a, b, c) = _figure(3)
    hist = {int(k.rsplit("/d", 1)[1]): v for k, v in summary.items() if "/run/branch_depth_hist/d" in k}
    if hist and sum(hist.values()) > 0:
        ds = sorted(hist)
        a.bar(ds, [hist[d] for d in ds], color="#4c72b0")
        a.set_xticks(ds)
        a.set_xlabel("branch-point depth (0 = root)")
        a.set_ylabel("branch points (whole run)")
        a.set_title("branch-depth histogram")
    else:
        _empty(a, "no branch points (chain rollouts or no trees)")
    depths = sorted({d for r in grows for d in per_depth(r, "signal_share")})
    steps = [float(r["step"]) for r in grows]
    if depths and any(_num(r.get(PREFIX + "signal_total")) for r in grows):
        stack = [[per_depth(r, "signal_share").get(d, 0.0) for r in grows] for d in depths]
        b.stackplot(steps, stack, labels=[f"d{d}" for d in depths], alpha=0.85)
        b.set_ylim(0, 1)
        b.set_xlabel("step")
        b.set_title("signal share by depth")
        b.legend(fontsize=7, loc="upper right")
    else:
        _empty(b, "no intra-tree signal")
    xs, ys = series(grows, PREFIX + "mean_branch_depth")
    if xs:
        c.plot(xs, ys, marker=".", label="mean branch depth")
        sx, sy = series(grows, PREFIX + "signal_mean_depth")
        c.plot(sx, sy, marker=".", label="signal-weighted depth")
        c.set_xlabel("step")
        c.set_title("where supervision comes from")
        c.legend(fontsize=8)
    else:
        _empty(c, "no granularity data")
    return _fig_b64(fig)


# ----------------------------------------------------------------------------- tree viewer data


def _cut(s: str, n: int) -> str:
    return s if len(s) <= n else s[:n] + f"… [{len(s) - n} more chars]"


def tree_view(tree: Tree) -> dict[str, Any]:
    """The viewer's compact JSON for one tree: per node its text, action, reward, advantage, V, signal."""
    advs_raw = tree.meta.get("advantages") if isinstance(tree.meta, dict) else None
    advs: dict[int, float] = {}
    if isinstance(advs_raw, dict):
        for k, v in advs_raw.items():
            if str(k).isdigit() and _num(v) is not None:
                advs[int(k)] = float(v)
    try:
        value, count = tree_values(tree)
        signal = {s.node_id: s.signal for s in branch_stats(tree)}
    except ValueError:  # unfinished tree: show it without values
        value, count, signal = None, None, {}
    nodes = []
    for nd in tree.nodes:
        below = tree.leaves_below(nd.id) if advs else []
        credit = math.fsum(advs.get(i, 0.0) for i in below) if advs else None
        nodes.append(
            {
                "id": nd.id,
                "d": nd.depth,
                "c": list(nd.children),
                "a": str(nd.action),
                "leaf": nd.is_leaf,
                "t": _cut(nd.text, MAX_TEXT),
                "o": _cut(nd.observation, MAX_OBS),
                "r": _num(nd.reward),
                "adv": advs.get(nd.id) if nd.is_leaf else credit,
                "v": None if value is None else round(float(value[nd.id]), 4),
                "n": None if count is None else int(count[nd.id]),
                "s": round(signal[nd.id], 4) if nd.id in signal else None,
                "tok": len(nd.token_ids),
                "obs_tok": len(nd.obs_ids),
                "ent": None if _num(nd.mean_entropy) is None else round(nd.mean_entropy, 3),
            }
        )
    meta = {k: v for k, v in tree.meta.items() if k != "advantages"} if isinstance(tree.meta, dict) else {}
    return {
        "index": tree.tree_index,
        "meta": _cut(json.dumps(meta, ensure_ascii=False, default=str), MAX_OBS) if meta else "",
        "nodes": nodes,
    }


def _pick_steps(steps: Sequence[int], k: int) -> list[int]:
    """At most k steps, evenly spread, always the first and the last."""
    if len(steps) <= k:
        return list(steps)
    if k <= 1:
        return [steps[-1]]
    idx = sorted({round(i * (len(steps) - 1) / (k - 1)) for i in range(k)})
    return [steps[i] for i in idx]


def viewer_data(run: RunData, max_steps: int = 8, max_prompts: int = 16) -> dict[str, Any]:
    steps = []
    for step in _pick_steps(list(run.tree_files), max_steps):
        try:
            forests = load_forests(run, step)
        except UserError as e:
            run.warnings.append(str(e))
            continue
        prompts = [
            {"group": f.group_id, "trees": [tree_view(t) for t in f.trees]} for f in forests[:max_prompts]
        ]
        steps.append({"step": step, "prompts": prompts, "total_prompts": len(forests)})
    return {"steps": steps}


def _json_for_script(data: Any) -> str:
    """JSON safe inside <script type=application/json>: no '<', '>' or '&' can end or confuse the block."""
    s = json.dumps(data, ensure_ascii=True, allow_nan=False, default=str)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ----------------------------------------------------------------------------- HTML


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.6em}
img.plot{max-width:100%;border:1px solid #eee}table{border-collapse:collapse;font-size:.9em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777}.warn{color:#a33}pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:.85em}
.controls{margin:8px 0;display:flex;gap:12px;align-items:center;flex-wrap:wrap}
details.node{margin-left:18px;border-left:2px solid #ddd;padding-left:6px}
details.tree{margin:8px 0;border:1px solid #ccc;border-radius:4px;padding:4px 8px}
summary{cursor:pointer;padding:2px 0}summary .badge{display:inline-block;border-radius:3px;padding:0 5px;
margin-right:4px;font-size:.8em;background:#eee}
.a-search{background:#dbeafe!important}.a-answer{background:#dcfce7!important}.a-invalid{background:#fee2e2!important}
.a-forced_final,.a-truncated{background:#fef3c7!important}
.steptext{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.85em;background:#fafafa;padding:4px;margin:2px 0}
.obs{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.8em;color:#555;background:#f3f3f3;padding:4px;margin:2px 0}
.pos{color:#15803d}.neg{color:#b91c1c}
"""

JS = r"""
(function(){
  "use strict";
  var data = JSON.parse(document.getElementById("tree-data").textContent);
  var stepSel = document.getElementById("step-select");
  var promptSel = document.getElementById("prompt-select");
  var out = document.getElementById("forest");
  function el(tag, cls, text){
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(x){ return (x === null || x === undefined) ? "–" : (Math.round(x * 1000) / 1000).toString(); }
  function badge(text, cls){ return el("span", "badge" + (cls ? " " + cls : ""), text); }
  function renderNode(tree, id){
    var n = tree.nodes[id];
    var det = el("details", "node");
    det.dataset.node = String(n.id);
    var sum = el("summary");
    if (n.id === 0) {
      sum.appendChild(badge("prompt"));
    } else {
      sum.appendChild(badge(n.a, "a-" + n.a));
    }
    sum.appendChild(badge("#" + n.id + " d" + n.d));
    if (n.r !== null && n.r !== undefined) sum.appendChild(badge("R " + fmt(n.r)));
    if (n.adv !== null && n.adv !== undefined) {
      var tone = n.adv > 1e-9 ? "pos" : (n.adv < -1e-9 ? "neg" : "");
      sum.appendChild(badge((n.leaf ? "A " : "ΣA ") + fmt(Math.abs(n.adv) < 1e-9 ? 0 : n.adv), tone));
    }
    if (n.v !== null && n.v !== undefined) sum.appendChild(badge("V " + fmt(n.v) + " (" + n.n + " leaves)"));
    if (n.s !== null && n.s !== undefined) sum.appendChild(badge("split: signal " + fmt(n.s)));
    var preview = n.id === 0 ? "" : n.t.replace(/\s+/g, " ").slice(0, 90);
    sum.appendChild(el("span", "muted", " " + preview));
    det.appendChild(sum);
    if (n.id !== 0) {
      det.appendChild(el("div", "muted", n.tok + " generated tokens, " + n.obs_tok + " observation tokens, mean entropy " + fmt(n.ent)));
      det.appendChild(el("div", "steptext", n.t));
      if (n.o) det.appendChild(el("div", "obs", n.o));
    }
    for (var i = 0; i < n.c.length; i++) det.appendChild(renderNode(tree, n.c[i]));
    return det;
  }
  function renderForest(){
    out.textContent = "";
    var st = data.steps[+stepSel.value];
    if (!st) return;
    var pr = st.prompts[+promptSel.value];
    if (!pr) return;
    for (var k = 0; k < pr.trees.length; k++) {
      var tree = pr.trees[k];
      var leaves = tree.nodes.filter(function(n){ return n.leaf; }).length;
      var box = el("details", "tree");
      box.open = true;
      box.appendChild(el("summary", null, "tree " + tree.index + " — " + tree.nodes.length + " nodes, " + leaves + " leaves, V(root) " + fmt(tree.nodes[0].v)));
      if (tree.meta) box.appendChild(el("div", "muted", tree.meta));
      var root = renderNode(tree, 0);
      root.open = true;
      box.appendChild(root);
      out.appendChild(box);
    }
  }
  function fillPrompts(){
    promptSel.textContent = "";
    var st = data.steps[+stepSel.value];
    if (!st) return;
    st.prompts.forEach(function(p, i){ var o = el("option", null, p.group); o.value = String(i); promptSel.appendChild(o); });
    var note = document.getElementById("prompt-note");
    note.textContent = st.total_prompts > st.prompts.length ? ("showing " + st.prompts.length + " of " + st.total_prompts + " prompts") : "";
    renderForest();
  }
  function setAll(open){
    var ds = out.querySelectorAll("details");
    for (var i = 0; i < ds.length; i++) ds[i].open = open;
  }
  if (!data.steps.length) return;
  data.steps.forEach(function(s, i){ var o = el("option", null, "step " + s.step); o.value = String(i); stepSel.appendChild(o); });
  stepSel.value = String(data.steps.length - 1);
  stepSel.addEventListener("change", fillPrompts);
  promptSel.addEventListener("change", renderForest);
  document.getElementById("expand-all").addEventListener("click", function(){ setAll(true); });
  document.getElementById("collapse-all").addEventListener("click", function(){ setAll(false); });
  fillPrompts();
  document.body.dataset.viewerReady = "1";
})();
"""


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == int(v) and abs(v) >= 1000:
            return f"{int(v):,}"
        return f"{v:.4g}"
    return str(v)


def _table(items: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td class='num'>{html.escape(_fmt(v))}</td></tr>"
        for k, v in items
    )
    return f"<table>{rows}</table>"


def _headline(run: RunData) -> list[tuple[str, Any]]:
    rows = run.metrics
    train = [r for r in rows if _num(r.get("train/reward_mean")) is not None]
    ev = eval_curve(rows)
    out: list[tuple[str, Any]] = [("logged steps", len(train))]
    if train:
        out.append(("last step", train[-1]["step"]))
        out.append(("train reward, first step", train[0]["train/reward_mean"]))
        out.append(("train reward, last step", train[-1]["train/reward_mean"]))
        out.append(("train reward, best", max(float(r["train/reward_mean"]) for r in train)))
    if ev:
        out.append(("eval EM, first", ev[0][2]))
        out.append(("eval EM, last", ev[-1][2]))
        out.append(("eval EM, best", max(e for _, _, e in ev)))
    for key, label in [
        ("budget/cum_generated_tokens", "generated tokens (total)"),
        ("budget/cum_prefill_tokens", "prefill tokens (total)"),
        ("budget/cum_tool_calls", "tool calls (total)"),
        ("budget/cum_trajectories", "trajectories (total)"),
    ]:
        xs, ys = series(rows, key)
        if ys:
            out.append((label, ys[-1]))
    for key, label in DIAGNOSTIC_LABELS.items():  # why a run has (no) RL signal: first → last step
        ys = series(rows, key)[1]
        if ys:
            out.append((f"{label}, first → last step", f"{_fmt(ys[0])} → {_fmt(ys[-1])}"))
    secs = series(rows, "time/step_seconds")[1]
    if secs:
        out.append(("seconds per step (mean)", sum(secs) / len(secs)))
    return out


def _granularity_headline(gsum: Mapping[str, float]) -> list[tuple[str, Any]]:
    p = PREFIX + "run/"
    keys = [
        ("branch_points_per_step", "branch points per step"),
        ("branch_points_per_tree", "branch points per tree"),
        ("mean_branch_depth", "mean branch depth"),
        ("signal_mean_depth", "signal-weighted mean depth"),
        ("informative_fraction", "branch points with a reward spread"),
        ("spread_mean", "mean children-value spread"),
        ("signal_per_tree", "intra-tree signal per tree"),
        ("inter_signal_total", "inter-tree signal (total)"),
    ]
    out: list[tuple[str, Any]] = [(label, gsum[p + k]) for k, label in keys if p + k in gsum]
    for k in sorted(
        (k for k in gsum if k.startswith(p + "signal_share/d")), key=lambda k: int(k.rsplit("d", 1)[1])
    ):
        out.append((f"signal share at depth {k.rsplit('d', 1)[1]}", gsum[k]))
    return out


def render_html(run: RunData, max_tree_steps: int = 8, max_prompts: int = 16) -> str:
    """The whole report page as a string (no file written)."""
    grows, gsource = granularity_rows(run)
    gsum = summarize_run(grows)
    train_rows = [r for r in run.metrics if "step" in r]
    learning = plot_learning(train_rows)
    budget = plot_budget(train_rows)
    gran = plot_granularity(grows, gsum)
    viewer = viewer_data(run, max_tree_steps, max_prompts)
    name = run.summary.get("name") or run.run_dir.name
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>treegrpo report: {esc(str(name))}</title><style>{CSS}</style></head><body>",
        f"<h1>treegrpo run report: {esc(str(name))}</h1>",
        f"<div class='muted'>{esc(str(run.run_dir.resolve()))}</div>",
    ]
    for w in run.warnings:
        parts.append(f"<p class='warn'>{esc(w)}</p>")
    parts.append("<h2>Summary</h2>")
    parts.append(
        _table(_headline(run)) if run.metrics else "<p class='muted'>no metrics.jsonl in this run</p>"
    )
    if run.summary:
        parts.append("<details><summary>summary.json</summary>")
        parts.append(_table([(k, v) for k, v in run.summary.items() if not isinstance(v, dict | list)]))
        parts.append("</details>")
    parts.append("<h2>Learning curves</h2>")
    parts.append(f"<img class='plot' alt='learning curves' src='data:image/png;base64,{learning}'>")
    parts.append("<h2>Budget per step</h2>")
    parts.append(
        f"<img class='plot' alt='budget per step' src='data:image/png;base64,{budget}'>"
        if budget
        else "<p class='muted'>no budget metrics logged</p>"
    )
    parts.append("<h2>Supervision granularity</h2>")
    src_note = {
        "metrics": "from the granularity/* metrics logged every step",
        "trees": f"recomputed from the {len(grows)} saved tree file(s)",
        "none": "no granularity metrics and no saved trees",
    }[gsource]
    parts.append(
        "<p class='muted'>Signal at a branch point p = Σ<sub>i</sub> n<sub>i</sub>·|V(c<sub>i</sub>) − V(p)| "
        "(V = mean leaf reward of a subtree, n = its leaves): the intra-tree credit the split creates. "
        f"Depth 0 = a split at the prompt (coarse), deeper = finer. Data {esc(src_note)}.</p>"
    )
    parts.append(f"<img class='plot' alt='granularity' src='data:image/png;base64,{gran}'>")
    if gsum:
        parts.append(_table(_granularity_headline(gsum)))
    parts.append(credit_html(load_credit(run.run_dir)))
    parts.append("<h2>Tree viewer</h2>")
    if viewer["steps"]:
        parts.append(
            "<p class='muted'>Each node is one agent step: click to expand. R = leaf reward, A = leaf advantage, "
            "ΣA = sum of the advantages of the leaves below (the credit a shared step's tokens receive), "
            "V = mean leaf reward of the subtree. Model text is shown verbatim (escaped).</p>"
            "<div class='controls'><label>step <select id='step-select'></select></label>"
            "<label>prompt <select id='prompt-select'></select></label><span id='prompt-note' class='muted'></span>"
            "<button id='expand-all' type='button'>expand all</button>"
            "<button id='collapse-all' type='button'>collapse all</button></div><div id='forest'></div>"
        )
        parts.append(f"<script type='application/json' id='tree-data'>{_json_for_script(viewer)}</script>")
        parts.append(f"<script>{JS}</script>")
    else:
        parts.append("<p class='muted'>no saved trees in this run (trainer.save_trees_every = 0?)</p>")
    if run.config_text:
        parts.append("<h2>Config</h2><details><summary>config.yaml</summary>")
        parts.append(f"<pre>{esc(run.config_text)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path | RunData, max_tree_steps: int = 8, max_prompts: int = 16) -> Path:
    """Write `run_dir/report.html` (self-contained) and return its path."""
    run = run_dir if isinstance(run_dir, RunData) else load_run(run_dir)
    page = render_html(run, max_tree_steps, max_prompts)
    out = run.run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out


def report_text(run_dir: str | Path | RunData) -> str:
    """A plain-text summary of the run for stdout."""
    run = run_dir if isinstance(run_dir, RunData) else load_run(run_dir)
    grows, gsource = granularity_rows(run)
    gsum = summarize_run(grows)
    lines = [f"== treegrpo report: {run.run_dir} =="]
    lines.extend(f"  warning: {w}" for w in run.warnings)
    if run.metrics:
        lines.extend(f"  {k}: {_fmt(v)}" for k, v in _headline(run))
    else:
        lines.append("  no metrics.jsonl")
    if not eval_curve(run.metrics):
        lines.append("  no evaluation in this run")
    lines.append(f"  saved tree steps: {len(run.tree_files)}")
    if gsum:
        lines.append(
            f"-- supervision granularity ({'logged metrics' if gsource == 'metrics' else 'saved trees'}) --"
        )
        lines.extend(f"  {k}: {_fmt(v)}" for k, v in _granularity_headline(gsum) if "signal share" not in k)
        p = PREFIX + "run/"
        depths = sorted(int(k.rsplit("d", 1)[1]) for k in gsum if k.startswith(p + "signal_share/d"))
        for d in depths:
            share = gsum[f"{p}signal_share/d{d}"]
            n_bp = gsum.get(f"{p}branch_depth_hist/d{d}", 0.0)
            bar = "#" * round(share * 40)
            lines.append(f"  depth {d}: {int(n_bp):>6} branch points, signal share {share:6.1%} {bar}")
    else:
        lines.append("  no granularity data (no saved trees and no granularity/* metrics)")
    credit = load_credit(run.run_dir)
    lines.extend(credit_text(credit) if credit else ["  no credit.json (run `treegrpo credit RUN_DIR`)"])
    return "\n".join(lines)


def report_cli(run_dir: str) -> int:
    """`treegrpo report RUN_DIR`: print the text summary, write report.html, print its path."""
    run = load_run(run_dir)
    path = write_report(run)
    text = report_text(run)
    print(text)
    print(f"report: {path}")
    return 0


__all__ = [
    "RunData",
    "eval_curve",
    "granularity_rows",
    "load_run",
    "render_html",
    "report_cli",
    "report_text",
    "tree_view",
    "viewer_data",
    "write_report",
]
