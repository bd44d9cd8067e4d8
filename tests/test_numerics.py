"""Numerics end to end: zero-variance groups, non-finite rewards, contexts longer than the model allows.

The runs use the tiny config of conftest.py with the ``reliability_plugins:switchable_reward`` reward,
whose value the ``TREEGRPO_TEST_REWARD`` environment variable can force (``0.5``, ``nan``, ``inf``).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from treegrpo.advantage import ESTIMATORS, compute_advantages
from treegrpo.cli import main
from treegrpo.run_log import read_metrics
from treegrpo.tree import ActionKind, read_jsonl

PLUGIN = ["--set", "env.reward=reliability_plugins:switchable_reward", "--set", "trainer.eval_every=0"]


def _train(cfg: Path, *sets: str, resume: bool = False) -> int:
    args = ["train", "--config", str(cfg), "--no-progress", *PLUGIN]
    for s in sets:
        args += ["--set", s]
    return main([*args, "--resume"] if resume else args)


def _run_dir(cfg: Path, name: str) -> Path:
    return Path(yaml.safe_load(cfg.read_text())["output_dir"]) / name


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_equal_rewards_give_zero_advantage(estimator: str) -> None:
    rewards = np.full(12, 0.7)
    groups = np.repeat([0, 1], 6)
    trees = np.tile(np.repeat([0, 1], 3), 2)
    adv = compute_advantages(rewards, groups, trees, estimator)
    assert np.all(adv == 0.0), adv


def test_zero_variance_groups_train_with_zero_advantage(tiny_config: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TREEGRPO_TEST_REWARD", "0.5")
    assert _train(tiny_config, "name=flat", "trainer.steps=2") == 0
    rows = [r for r in read_metrics(_run_dir(tiny_config, "flat")) if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["train/reward_mean"] == 0.5 and r["train/reward_std"] == 0.0
        assert r["train/adv_abs_mean"] == 0.0
        assert r["pg_loss"] == 0.0  # no signal from the policy-gradient term at all
        assert math.isfinite(r["loss"]) and "train/skipped" not in r


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_rewards_skip_updates_then_stop_keeping_the_last_good_checkpoint(
    tiny_config: Path, monkeypatch, capsys, bad: str
) -> None:
    name = f"bad-{bad}"
    common = [f"name={name}", "trainer.save_every=1", "trainer.keep_last=1", "trainer.max_bad_steps=3"]
    assert _train(tiny_config, *common, "trainer.steps=2") == 0
    ckpts = _run_dir(tiny_config, name) / "checkpoints"
    good = ckpts / "step-000002"
    before = _digest(good)
    capsys.readouterr()

    monkeypatch.setenv("TREEGRPO_TEST_REWARD", bad)
    with pytest.warns(UserWarning, match="update skipped"):
        code = _train(tiny_config, *common, "trainer.steps=20", resume=True)
    assert code == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1, err  # progress log lines, one-line warnings, one error line
    assert "3 consecutive non-finite steps" in errors[0] and "step-000002" in errors[0]
    assert "Traceback" not in err
    # Skipped steps wrote no checkpoint, so keep_last=1 did not prune the good one.
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002"]
    assert _digest(good) == before
    rows = {r["step"]: r for r in read_metrics(_run_dir(tiny_config, name))}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    for s in (3, 4, 5):
        assert rows[s]["train/skipped"] == 1.0 and "loss" not in rows[s]
        assert rows[s]["train/reward_mean"] is None  # non-finite is written as null, the file stays JSON
    # ... and the run resumes from that checkpoint once the reward is healthy again.
    monkeypatch.delenv("TREEGRPO_TEST_REWARD")
    assert _train(tiny_config, *common, "trainer.steps=3", resume=True) == 0
    rows = {r["step"]: r for r in read_metrics(_run_dir(tiny_config, name))}
    assert sorted(rows) == [1, 2, 3] and "train/skipped" not in rows[3]


def test_context_limit_ends_branches_cleanly(tiny_config: Path, capsys) -> None:
    limit = 170  # the tiny task's prompts are ~120 tokens; a step is <= 24 tokens + an observation
    assert _train(tiny_config, "name=short", "trainer.steps=2", f"rollout.max_context_tokens={limit}") == 0
    run = _run_dir(tiny_config, "short")
    truncated = 0
    leaves = 0
    for f in sorted((run / "trees").glob("step-*.jsonl")):
        for tree in read_jsonl(f):
            for leaf in tree.leaves():
                leaves += 1
                truncated += leaf.action == ActionKind.TRUNCATED
                assert len(tree.path(leaf.id).token_ids) <= limit
                assert leaf.reward is not None and math.isfinite(leaf.reward)
    assert leaves == 2 * 24 and truncated > 0
    print(f"max_context_tokens={limit}: {truncated} of {leaves} leaves truncated")
    for r in read_metrics(run):
        assert math.isfinite(r["loss"])


def test_prompt_longer_than_the_context_is_a_clear_error(tiny_config: Path, capsys) -> None:
    assert _train(tiny_config, "name=tooshort", "trainer.steps=1", "rollout.max_context_tokens=20") == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "rollout.max_context_tokens=20" in errors[0] and "row" in errors[0]
