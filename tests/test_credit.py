"""Credit quality by depth: Monte-Carlo truth, per-step credit as the loss gives it, the metrics."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from treegrpo.advantage import compute_advantages
from treegrpo.credit import (
    NODE_VALUE,
    StepKey,
    aggregate,
    by_depth,
    credit_by_depth,
    depth_metrics,
    generated_steps,
    mc_values,
    pearson,
    spearman,
    step_credit,
    step_records,
    step_truth,
)
from treegrpo.credit.report import credit_html, credit_text, load_credit
from treegrpo.credit.toy import ChoiceEnv, ChoicePolicy
from treegrpo.credit.truth import StepTruth
from treegrpo.packing import pack
from treegrpo.rollout import RolloutConfig, sample_forests
from treegrpo.tree import leaf_arrays

ROOT = Path(__file__).resolve().parents[1]


def _forests(p_good, weights, cfg: RolloutConfig, n: int = 40, seed: int = 0):
    policy, env = ChoicePolicy(p_good, seed=seed), ChoiceEnv(weights)
    rows = [{"id": i} for i in range(n)]
    res = sample_forests(rows, [str(i) for i in range(n)], policy, env, cfg, rng=seed)
    return res.forests, policy, env


def _exact_truth(forests, env: ChoiceEnv, p_good) -> dict[StepKey, StepTruth]:
    out = {}
    for key, _ in generated_steps(forests):
        tree = forests[key.forest].trees[key.tree]
        node = tree.nodes[key.node]
        v = env.true_value(node.state, p_good)
        out[key] = StepTruth(v - env.true_value(tree.nodes[node.parent].state, p_good), 0.0)
    return out


def test_monte_carlo_values_converge_to_the_closed_form() -> None:
    p_good, weights = (0.3, 0.8, 0.6), (1.0, 0.5, 2.0)
    forests, policy, env = _forests(p_good, weights, RolloutConfig(m=2, n=2, l=1), n=20)
    values = mc_values(forests, policy, env, k=64)
    z = []
    for key, v in values.items():
        node = forests[key.forest].trees[key.tree].nodes[key.node]
        exact = env.true_value(node.state, p_good)
        if node.is_leaf:
            assert v.mean == exact and v.se == 0.0 and v.n == 0
            continue
        assert v.n == 64 and v.se > 0
        z.append((v.mean - exact) / v.se)
    z = np.asarray(z)
    assert len(z) > 50
    assert np.abs(z).max() < 4.5  # every estimate within a few standard errors
    assert abs(z.mean()) < 0.5 and 0.6 < z.std() < 1.4  # and the SE is calibrated (z ~ N(0, 1))
    # A* = w_d·([good] − p_d) in closed form, recovered within its SE.
    truth = step_truth(forests, values)
    for key, depth in generated_steps(forests):
        node = forests[key.forest].trees[key.tree].nodes[key.node]
        exact = weights[depth] * (float(node.state.choices[-1]) - p_good[depth])
        assert abs(truth[key].a_star - exact) < 5 * truth[key].se + 1e-12


def test_more_rollouts_shrink_the_error() -> None:
    p_good, weights = (0.5, 0.5, 0.5), (1.0, 1.0, 1.0)
    forests, policy, env = _forests(p_good, weights, RolloutConfig(strategy="chain", num_generations=2), n=12)
    root = StepKey(0, 0, 0)
    errs = {}
    for k in (4, 144):
        v = mc_values(forests, ChoicePolicy(p_good, seed=k), env, k=k)
        errs[k] = np.mean(
            [abs(v[StepKey(f, 0, 0)].mean - 1.5) for f in range(len(forests))]
        )  # V(root) = Σ w·p = 1.5
        assert v[root].n == k
    assert errs[144] < errs[4] / 2.5  # the error falls like 1/sqrt(k): 6x expected


def test_credit_is_what_the_loss_gives_each_token() -> None:
    """Σ w_l·A_l over the leaves below a node equals the packed per-token advantage sums, every token."""
    forests, _, _ = _forests((0.5, 0.5, 0.5), (1.0, 1.0, 1.0), RolloutConfig(m=2, n=3, l=1), n=6)
    trees = [t for f in forests for t in f.trees]
    rewards, groups, tree_ids = leaf_arrays(forests)
    for mode in ("token-mean", "seq-mean-token-mean"):
        adv = compute_advantages(rewards, groups, tree_ids, "tree")
        batch = pack(trees, adv.tolist(), packing="tree", loss_agg_mode=mode)
        credit = step_credit(forests, "tree", loss_agg_mode=mode)
        index = {}
        for fi, f in enumerate(forests):
            for ti in range(len(f.trees)):
                index[len(index)] = (fi, ti)
        checked = 0
        per_token = (batch.weights.adv_pos + batch.weights.adv_neg).double()
        for row, tree_i in enumerate(batch.row_tree):
            fi, ti = index[tree_i]
            for col in range(batch.input_ids.shape[1]):
                if batch.loss_mask[row, col]:
                    nid = int(batch.node_ids[row, col])
                    assert float(per_token[row, col]) == pytest.approx(
                        credit[StepKey(fi, ti, nid)], abs=1e-12
                    )
                    checked += 1
        assert checked > 50


def test_tree_credit_has_the_sign_of_a_star_at_branch_points() -> None:
    p_good, weights = (0.5, 0.9, 0.5), (1.0, 0.0, 0.3)
    cfg = RolloutConfig(strategy="fixed_depth", fixed_depth=0, m=1, n=12, l=1)
    forests, policy, env = _forests(p_good, weights, cfg, n=60)
    truth = step_truth(forests, mc_values(forests, policy, env, k=32))
    credit = step_credit(forests, "tree")
    agree = total = 0
    for f_i, f in enumerate(forests):
        for node in f.trees[0].nodes[1:]:
            if node.depth != 1:  # the children of the root: the branch point of every tree
                continue
            key = StepKey(f_i, 0, node.id)
            exact = weights[0] * (float(node.state.choices[0]) - p_good[0])
            assert math.copysign(1, truth[key].a_star) == math.copysign(1, exact)  # MC truth has the sign
            if credit[key] != 0:
                total += 1
                agree += (credit[key] > 0) == (exact > 0)
    assert total > 500
    assert agree / total > 0.8
    table = credit_by_depth(forests, truth, ["tree"])["tree"]
    assert table["0"]["sign_agreement"] > 0.8
    assert table["0"]["spearman"] > 0.6


def test_chain_credit_is_constant_along_a_trajectory_and_the_metric_shows_it() -> None:
    """Only the last step decides; chain GRPO still spends as much credit on the first two steps."""
    p_good, weights = (0.5, 0.5, 0.5), (0.0, 0.0, 1.0)
    forests, policy, env = _forests(p_good, weights, RolloutConfig(strategy="chain", num_generations=4), n=60)
    credit = step_credit(forests, "grpo")
    for fi, f in enumerate(forests):
        for ti, tree in enumerate(f.trees):
            vals = {credit[StepKey(fi, ti, n.id)] for n in tree.nodes[1:]}
            assert len(vals) == 1  # one number for every step of the trajectory
    exact = _exact_truth(forests, env, p_good)
    table = credit_by_depth(forests, exact, ["grpo"])["grpo"]
    assert table["0"]["wasted_share"] == 1.0 and table["1"]["wasted_share"] == 1.0
    # Every non-zero last-step credit has A*'s sign; a group whose 4 rewards tie gives 0 (no credit).
    last = [credit[k] for k, d in generated_steps(forests) if d == 2]
    assert table["2"]["wasted_share"] == 0.0 and table["2"]["sign_agreement"] == 1.0
    assert table["2"]["signed_share"] == pytest.approx(np.mean([c != 0 for c in last]))
    assert 0.7 < table["2"]["signed_share"] < 1.0
    assert table["0"]["spearman"] is None  # A* = 0 exactly: nothing to correlate with
    # A tree branching only at the decisive step puts no intra-tree credit on the shared steps.
    tree_cfg = RolloutConfig(strategy="fixed_depth", fixed_depth=2, m=2, n=2, l=1)
    t_forests, _, _ = _forests(p_good, weights, tree_cfg, n=60)
    t_table = credit_by_depth(t_forests, _exact_truth(t_forests, env, p_good), ["tree_intra"])["tree_intra"]
    t_credit = step_credit(t_forests, "tree_intra")
    t_first = [abs(t_credit[k]) for k, d in generated_steps(t_forests) if d == 0]
    t_last = [t_credit[k] for k, d in generated_steps(t_forests) if d == 2]
    assert sum(t_first) < 1e-12 * sum(abs(c) for c in t_last)  # intra z-scores sum to 0 in a tree
    assert t_table["2"]["sign_agreement"] == 1.0
    assert t_table["2"]["signed_share"] == pytest.approx(np.mean([c != 0 for c in t_last]))


def test_node_value_credit_and_every_estimator_run() -> None:
    forests, policy, env = _forests((0.5, 0.5, 0.5), (1.0, 1.0, 1.0), RolloutConfig(), n=10)
    truth = step_truth(forests, mc_values(forests, policy, env, k=8))
    tables = credit_by_depth(
        forests, truth, ["tree", "tree_intra", "tree_inter", "tree_2norm", "grpo", "rloo", NODE_VALUE]
    )
    assert set(tables["tree"]) == {"0", "1", "2"}
    recs = step_records(forests, truth, NODE_VALUE)
    tree = forests[0].trees[0]
    leaf = tree.leaves()[0]
    rec = next(r for r in recs if r.key == StepKey(0, 0, leaf.id))
    parent_leaves = [tree.nodes[i].reward for i in tree.leaves_below(leaf.parent)]
    assert rec.credit == pytest.approx(leaf.reward - np.mean(parent_leaves))


def test_metrics_values_and_degenerate_cases() -> None:
    a = np.array([-1.0, 0.0, 0.5, 2.0])
    se = np.array([0.1, 0.1, 0.1, 0.1])
    perfect = depth_metrics(3 * a, a, se)
    assert perfect["spearman"] == pytest.approx(1.0) and perfect["pearson"] == pytest.approx(1.0)
    assert perfect["sign_agreement"] == 1.0 and perfect["wasted_share"] == 0.0 and perfect["snr"] == 1e6
    flipped = depth_metrics(-a, a, se)
    assert flipped["sign_agreement"] == 0.0 and flipped["spearman"] == pytest.approx(-1.0)
    # Known numbers: credit 1 on the A* = 0 step of four equal |credit| steps → 1/4 wasted.
    m = depth_metrics([1.0, 1.0, -1.0, 1.0], a, se)
    assert m["wasted_share"] == pytest.approx(0.25) and m["sign_agreement"] == pytest.approx(1 / 3)
    # snr: c = a + e with e ⟂ a, |e|² = |a|² → snr 1.
    m = depth_metrics([1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    assert m["snr"] == pytest.approx(1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)  # scipy's value
    # Degenerate: constants, a single step, no significant step, zero credit.
    assert pearson([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2, 3], [5, 5, 5]) is None
    one = depth_metrics([1.0], [1.0], [0.0])
    assert one["spearman"] is None and one["pearson"] is None and one["snr"] is None
    assert one["sign_agreement"] == 1.0 and one["signed_share"] == 1.0
    two = depth_metrics([1.0, 2.0], [1.0, 3.0], [0.0, 0.0])
    assert two["pearson"] is None  # two points always lie on a line
    # A significant step that gets no credit: not a wrong sign, but no supervision.
    silent = depth_metrics([0.0, 1.0, 1e-20], [1.0, 1.0, -1.0], [0.1, 0.1, 0.1])
    assert silent["sign_agreement"] == 1.0 and silent["signed_share"] == pytest.approx(1 / 3)
    zero = depth_metrics([0.0, 0.0], [0.0, 0.0], [0.1, 0.1])
    assert zero["sign_agreement"] is None and zero["wasted_share"] is None and zero["snr"] is None
    assert zero["signed_share"] is None
    empty = depth_metrics([], [], [])
    assert empty["n_steps"] == 0 and all(empty[k] is None for k in ("spearman", "sign_agreement", "snr"))
    json.dumps(zero)  # no NaN, no infinity
    with pytest.raises(ValueError, match="one shape"):
        depth_metrics([1.0], [1.0, 2.0], [0.0, 0.0])


def test_by_depth_and_aggregate_over_seeds() -> None:
    t1 = by_depth([0, 0, 1, 1, 1], [1.0, -1.0, 1.0, 2.0, 3.0], [1.0, -1.0, 0.5, 1.0, 2.0], [0.1] * 5)
    t2 = by_depth([0, 0, 1], [1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [0.1] * 3)
    agg = aggregate([t1, t2])
    assert agg["0"]["n_steps"] == 4 and agg["1"]["n_steps"] == 4
    assert agg["0"]["sign_agreement"] == pytest.approx(0.75)  # mean of 1.0 and 0.5
    assert agg["0"]["sd"]["sign_agreement"] == pytest.approx(np.std([1.0, 0.5], ddof=1))
    assert agg["1"]["spearman"] == pytest.approx(1.0) and agg["1"]["seeds"]["spearman"] == 1
    assert agg["1"]["sd"]["spearman"] is None


def test_mc_values_rejects_k_below_two() -> None:
    forests, policy, env = _forests((0.5,), (1.0,), RolloutConfig(strategy="chain"), n=1)
    with pytest.raises(ValueError, match="k must be >= 2"):
        mc_values(forests, policy, env, k=1)
    from treegrpo.tree import Tree, group_forests

    reread = group_forests([Tree.from_dict(t.to_dict()) for f in forests for t in f.trees])
    with pytest.raises(ValueError, match="no environment state"):
        mc_values(reread, policy, env, k=2)


def test_report_section_reads_credit_json(tmp_path: Path) -> None:
    assert load_credit(tmp_path) is None
    assert "treegrpo credit" in credit_html(None)
    (tmp_path / "credit.json").write_text("{not json")
    assert load_credit(tmp_path) is None
    data = {
        "setup": {"k": 16},
        "strategies": {"random/tree": {"budget": {}, "by_depth": {"0": {"n_steps": 3, "spearman": 0.5}}}},
    }
    (tmp_path / "credit.json").write_text(json.dumps(data))
    loaded = load_credit(tmp_path)
    assert loaded == data
    text = "\n".join(credit_text(loaded))
    assert "random/tree" in text and "0.50" in text and "K=16" in text
    page = credit_html(loaded)
    assert "<td>random/tree</td><td>0</td><td>3</td><td>0.50</td>" in page


def test_quick_benchmark_prints_the_table_with_the_keys() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "credit.py"),
            "--json",
            "--quick",
            "--out",
            "/tmp/credit-q",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert set(out) == {"setup", "strategies"}
    s = out["strategies"]
    assert {"chain", "random", "random/node_value", "fixed_depth=0", "tree(1,2,1)", "chain(2)"} <= set(s)
    for entry in s.values():
        assert set(entry) == {"budget", "by_depth"}
        assert set(entry["by_depth"]) == {"0", "1", "2"}
        for m in entry["by_depth"].values():
            assert {"n_steps", "spearman", "pearson", "sign_agreement", "wasted_share", "snr"} <= set(m)
    # The toy's step 1 decides nothing (weight 0): most credit there is wasted, for every strategy.
    assert s["random"]["by_depth"]["1"]["wasted_share"] > 0.8
    assert s["chain"]["by_depth"]["1"]["wasted_share"] > 0.8
    # Its steps 0 and 2 decide: the tree's credit has the right sign most of the time.
    assert s["random"]["by_depth"]["0"]["sign_agreement"] > 0.6
    assert s["random"]["by_depth"]["2"]["sign_agreement"] > 0.6
    assert s["chain"]["budget"]["trajectories"] == 4.0 and s["random"]["budget"]["trajectories"] == 6.0


def test_credit_command_writes_json_that_the_report_shows(tiny_config: Path, tmp_path: Path, capsys) -> None:
    from treegrpo.cli import main
    from treegrpo.config import load_config
    from treegrpo.report import report_text

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(load_config(tiny_config).to_yaml())
    assert "no credit.json" in report_text(run_dir)
    assert main(["credit", str(run_dir), "--k", "2", "--prompts", "2"]) == 0
    data = json.loads((run_dir / "credit.json").read_text())
    assert data["setup"]["k"] == 2 and data["setup"]["prompts"] == 2 and data["setup"]["checkpoint"] is None
    ((name, entry),) = data["strategies"].items()
    assert name == "random/tree"
    assert entry["by_depth"]["0"]["n_steps"] >= 2 * 2  # 2 prompts × m=2 trees: at least one first step each
    assert "credit quality by depth" in report_text(run_dir)
    capsys.readouterr()
    assert main(["credit", str(tmp_path / "nope")]) == 2
    assert main(["credit", str(run_dir), "--k", "1"]) == 2
    err = capsys.readouterr().err
    assert "not a treegrpo run directory" in err and "--k" in err


def test_planted_mistakes_sit_at_known_depths() -> None:
    from treegrpo.tasks import build_task

    task = build_task(
        "synthetic-kb", n_entities=60, max_hops=2, train_hops=2, guess_prob=0.3, distractor_prob=0.3
    )
    demos = task.demonstrations(n=200, seed=0)
    kinds = [d.mistake for d in demos]
    assert 0.2 < kinds.count("guess") / 200 < 0.4 and 0.2 < kinds.count("distractor") / 200 < 0.4
    docs = {d["title"]: d["text"] for d in task.corpus}
    for d in demos:
        chain = d.row["chain"]
        if d.mistake == "guess":  # depth 0: answers at once, wrongly
            assert len(d.steps) == 1 and d.steps[0].endswith(f"<answer> {chain[0]} </answer>")
        elif d.mistake == "distractor":  # last step: every search right, another retrieved name answered
            wrong = d.row["distractor"]
            assert len(d.steps) == 3 and d.steps[-1].endswith(f"<answer> {wrong} </answer>")
            assert wrong != chain[-1] and wrong in docs[chain[-2]]
        else:
            assert d.correct and d.steps[-1].endswith(f"<answer> {chain[-1]} </answer>")
    # No planted mistakes by default: the quickstart's demonstrations are unchanged.
    plain = build_task("synthetic-kb", n_entities=60, max_hops=2).demonstrations(n=50, early_stop_prob=0.5)
    assert {d.mistake for d in plain} <= {"", "early_stop"}
    with pytest.raises(ValueError, match="guess_prob"):
        build_task("synthetic-kb", n_entities=60, guess_prob=1.5)


def test_benchmark_counts_planted_mistakes_at_their_depths() -> None:
    import importlib.util

    from treegrpo.tree import ActionKind, Forest, Tree

    spec = importlib.util.spec_from_file_location("bench_credit", ROOT / "benchmarks" / "credit.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    row = {"path": ["founder", "birthplace"], "chain": ["A", "B", "C"], "distractor": "B"}

    def chain(*steps: tuple[ActionKind, str]) -> Tree:
        t = Tree.new("g", 0, [1])
        for i, (kind, text) in enumerate(steps):
            t.add_child(len(t.nodes) - 1, text=text, action=kind, is_leaf=i == len(steps) - 1, reward=0.0)
        return t

    s = (ActionKind.SEARCH, "<search> q </search>")
    trees = [
        chain((ActionKind.ANSWER, "<answer> A </answer>")),  # guess at step 0
        chain(s, (ActionKind.ANSWER, "<answer> B </answer>")),  # stops one hop early
        chain(s, s, (ActionKind.ANSWER, "<answer> b </answer>")),  # all searches, then the distractor
        chain(s, s, (ActionKind.ANSWER, "<answer> C </answer>")),  # right
    ]
    rates = bench.mistake_rates([Forest("g", trees)], [row])
    assert rates == {"guess_at_step0": 0.25, "early_stop": 0.25, "distractor_at_last_step": 0.5, "chains": 4}
