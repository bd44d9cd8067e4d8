"""The plug-in path as a new user walks it: own env, own data, own demonstrations, tiny default model."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from treegrpo.build import build_retriever, build_run, load_data
from treegrpo.cli import main
from treegrpo.config import load_config
from treegrpo.policies import HFPolicy
from treegrpo.rollout import RolloutConfig, sample_forests

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"


@pytest.fixture
def on_path(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(EX))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def arith_cfg(tmp_path: Path, *sets: str):
    base = [
        f"output_dir={tmp_path / 'runs'}",
        f"cache_dir={tmp_path / 'cache'}",
        f"data.train_path={EX / 'arith/train.jsonl'}",
        f"data.eval_path={EX / 'arith/eval.jsonl'}",
        f"warmstart.demos_path={EX / 'arith/demos.jsonl'}",
    ]
    return load_config(EX / "arith.yaml", [*base, *sets])


def test_demos_warm_start_gives_reward_variance_at_rl_start(on_path):
    """A plug-in env with no build_prompt, no retriever, own data, tiny model, demos jsonl → RL has signal."""
    cfg = arith_cfg(on_path)  # the example's own settings (200 demos x 20 epochs, ~20 s)
    logs: list[str] = []
    parts = build_run(cfg, log=logs.append)
    assert parts.task is None and build_retriever(cfg, None) is None  # no corpus needed
    sft = parts.warmstart["sft"]
    assert sft["examples"] == 200 and sft["demo_reward_mean"] == 1.0  # replayed: real observations
    assert sft["loss_after"] < 0.1 * sft["loss_before"]
    pol = HFPolicy(parts.model, parts.tokenizer, max_new_tokens=16, seed=0)
    rows = parts.train_rows[:8]
    res = sample_forests(rows, [r["group_id"] for r in rows], pol, parts.env, RolloutConfig(m=2, n=2, l=1))
    rewards = [leaf.reward for f in res.forests for t in f.trees for leaf in t.leaves()]
    assert len(rewards) == 8 * 6
    assert 0.0 < np.mean(rewards) < 1.0 and np.var(rewards) > 0.0
    # the steps stop at the env's tags, and calc observations are the tool's real results
    calc = [n for f in res.forests for t in f.trees for n in t.nodes[1:] if "</calc>" in n.text]
    assert calc and all(n.text.endswith("</calc>") for n in calc)
    assert all(n.observation.startswith("\n<result>") for n in calc)


def test_warm_start_never_silently_does_nothing(on_path, capsys):
    cfg = arith_cfg(on_path, "warmstart.demos_path=", "trainer.steps=0", "trainer.eval_every=0")
    logs: list[str] = []
    parts = build_run(cfg, log=logs.append)
    assert "sft" not in parts.warmstart
    assert any(line.startswith("warm start: skipped") and "warmstart.demos_path" in line for line in logs)


def test_env_reward_is_applied_or_refused(on_path, capsys):
    (on_path / "rw_plug.py").write_text(
        textwrap.dedent(
            """
            from arith_env import ArithEnv

            class Scored(ArithEnv):
                def __init__(self, reward_fn=None, **kw):
                    super().__init__(**kw)
                    self.reward_fn = reward_fn

            def half(response, golden_answers):
                return 0.5
            """
        )
    )
    args = [
        "train",
        "--config",
        str(EX / "arith.yaml"),
        "--no-progress",
        "--set",
        "env.reward=no_such_pkg.rewards:nope",
    ]
    assert main(args) == 2
    assert "no_such_pkg" in capsys.readouterr().err.strip().splitlines()[-1]
    cfg = arith_cfg(on_path, "env.reward=rw_plug:half")
    from treegrpo.build import build_env

    with pytest.raises(Exception, match=r"env.reward: arith_env:ArithEnv takes no reward_fn"):
        build_env(cfg, None, None)
    cfg = arith_cfg(on_path, "env.reward=rw_plug:half", "env.name=rw_plug:Scored")
    env = build_env(cfg, None, None)
    assert env.reward_fn("x", ["y"]) == 0.5


def test_plugin_can_register_a_task(on_path):
    """Plug-in modules are imported before tasks are resolved."""
    (on_path / "task_plug.py").write_text(
        textwrap.dedent(
            """
            from arith_env import ArithEnv
            from treegrpo.tasks import Task, register_task

            def _build(n=4):
                rows = [{"question": f"What is {i} * 2 ?", "golden_answers": [str(2 * i)],
                         "group_id": f"t/{i}", "index": i} for i in range(n)]
                return Task("doubles", [], rows[:3], rows[3:])

            register_task("doubles", _build)
            Env = ArithEnv
            """
        )
    )
    cfg = load_config(None, ["env.name=task_plug:Env", "data.task=doubles", "data.task_kwargs={n: 4}"])
    task, train, evals = load_data(cfg)
    assert task.name == "doubles" and len(train) == 3 and len(evals) == 1


def test_bad_demos_file_is_one_line(on_path, capsys):
    bad = on_path / "demos.jsonl"
    bad.write_text('{"question": "q", "golden_answers": ["1"], "steps": []}\n')
    args = ["train", "--config", str(EX / "arith.yaml"), "--no-progress"]
    for s in (f"warmstart.demos_path={bad}", f"output_dir={on_path}/r", f"cache_dir={on_path}/c"):
        args += ["--set", s]
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "demos.jsonl line 1: the demonstration has no agent step" in last
