"""`treegrpo train` end to end on a tiny config: run directory, finite metrics, resume equality."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from treegrpo.cli import main
from treegrpo.diagnostics import LABELS as DIAGNOSTIC_LABELS
from treegrpo.diagnostics import signal_diagnostics
from treegrpo.rewards import is_valid_format
from treegrpo.run_log import read_metrics
from treegrpo.tree import group_forests, read_jsonl


def _metrics(run: Path) -> list[dict]:
    return read_metrics(run)


def test_train_writes_a_complete_run_directory(tiny_config: Path, capsys):
    assert main(["train", "--config", str(tiny_config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "run summary" in out
    cfg = yaml.safe_load(tiny_config.read_text())
    run = Path(cfg["output_dir"]) / "tiny"
    assert (run / "config.yaml").is_file()
    assert (run / "summary.json").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "trees").glob("*.jsonl")) == [
        "step-000001.jsonl",
        "step-000002.jsonl",
        "step-000003.jsonl",
    ]
    rows = _metrics(run)
    steps = [r["step"] for r in rows]
    assert steps == [0, 1, 2, 3]  # step 0 = evaluation of the starting model
    for r in rows[1:]:
        for key in (
            "train/reward_mean",
            "budget/generated_tokens",
            "budget/tool_calls",
            "budget/trajectories",
            "loss",
            "kl",
            "entropy",
            "lr",
            "time/step_seconds",
        ):
            assert key in r, key
            assert r[key] is not None and math.isfinite(r[key]), (key, r[key])
        # (2,2,1) on 4 prompts: 6 leaves per prompt
        assert r["budget/trajectories"] == 24
        # supervision granularity is logged every step: every branch point sits at some depth
        hist = {k: v for k, v in r.items() if k.startswith("granularity/branch_depth_hist/")}
        assert hist and sum(hist.values()) == r["granularity/branch_points"] > 0
    assert "eval/em" in rows[0] and "eval/em" in rows[2]
    # checkpoints load with plain from_pretrained
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-000002", "step-000003"]
    model = AutoModelForCausalLM.from_pretrained(ckpts[-1])
    assert model.config.model_type == "llama"
    summary = json.loads((run / "summary.json").read_text())
    assert any(k.startswith("granularity/run/signal_share/") for k in summary)
    tree = json.loads((run / "trees" / "step-000003.jsonl").read_text().splitlines()[0])
    assert tree["meta"]["advantages"]
    # RL-signal diagnostics are logged every step and are exactly those of the step's saved trees
    max_new = yaml.safe_load((run / "config.yaml").read_text())["policy"]["max_new_tokens"]
    for r in rows[1:]:
        forests = group_forests(read_jsonl(run / "trees" / f"step-{r['step']:06d}.jsonl"))
        want = signal_diagnostics(forests, max_new, is_valid_format)
        assert set(want) == set(DIAGNOSTIC_LABELS)
        for k, v in want.items():
            assert r[k] == pytest.approx(v), k


def test_existing_run_requires_resume(tiny_config: Path, capsys):
    assert main(["train", "--config", str(tiny_config), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(tiny_config), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_reproduces_the_uninterrupted_run(tiny_config: Path, tmp_path: Path):
    keys = ("train/reward_mean", "loss", "budget/generated_tokens", "grad_norm", "entropy")
    base = ["--config", str(tiny_config), "--no-progress", "--set", "trainer.eval_every=0"]
    assert main(["train", *base, "--set", "name=full", "--set", "trainer.steps=4"]) == 0
    assert main(["train", *base, "--set", "name=part", "--set", "trainer.steps=2"]) == 0
    assert main(["train", *base, "--set", "name=part", "--set", "trainer.steps=4", "--resume"]) == 0
    runs = Path(yaml.safe_load(tiny_config.read_text())["output_dir"])
    full = {r["step"]: r for r in _metrics(runs / "full")}
    part = {r["step"]: r for r in _metrics(runs / "part")}
    assert sorted(part) == [1, 2, 3, 4]
    for step in (3, 4):
        for k in keys:
            assert part[step][k] == full[step][k], (step, k, part[step][k], full[step][k])


def test_rollout_and_eval_commands(tiny_config: Path, tmp_path: Path, capsys):
    from treegrpo.tree import read_jsonl

    out = tmp_path / "trees.jsonl"
    assert main(["rollout", "--config", str(tiny_config), "--out", str(out), "--prompts", "3"]) == 0
    trees = list(read_jsonl(out))
    assert len(trees) == 6  # 3 prompts x m=2 trees
    assert all(len(t.leaves()) == 3 for t in trees)  # 1 + n*l leaves per tree
    assert all(t.meta["advantages"] for t in trees)
    capsys.readouterr()
    assert main(["eval", "--config", str(tiny_config)]) == 0
    printed = capsys.readouterr().out
    assert "eval/em:" in printed and "eval/n: 8" in printed.replace("8.0000", "8")


def test_pretrained_model_with_lora_and_warm_start(tiny_config: Path, tmp_path: Path):
    """model.path + LoRA: the adapter is warm-started by SFT on the task's demonstrations, then RL runs."""
    from treegrpo.models import tiny_causal_lm
    from treegrpo.tasks import build_task
    from treegrpo.tokenizer import train_tokenizer

    task = build_task("synthetic-kb", seed=0, n_entities=40, max_hops=2)
    texts = [f"{d['title']} {d['text']}" for d in task.corpus] + [r["question"] for r in task.train_rows]
    texts += [s for d in task.demonstrations(n=64) for s in d.steps]
    tok = train_tokenizer(texts + ["Answer the question search information"], kind="wordlevel")
    path = tmp_path / "pretrained"
    tiny_causal_lm(tok, hidden=32, layers=1, heads=2).save_pretrained(path)
    tok.save_pretrained(path)
    args = ["train", "--config", str(tiny_config), "--no-progress", "--set", f"model.path={path}"]
    args += ["--set", "model.lora=true", "--set", "model.lora_r=4", "--set", "warmstart.enabled=true"]
    args += ["--set", "warmstart.num_demos=8", "--set", "warmstart.epochs=2", "--set", "trainer.steps=1"]
    assert main([*args, "--set", "name=pre"]) == 0
    runs = Path(yaml.safe_load(tiny_config.read_text())["output_dir"])
    summary = json.loads((runs / "pre" / "summary.json").read_text())
    assert summary["steps"] == 1
    assert summary["warmstart_cached"] is False and summary["warmstart_seconds"] > 0  # the SFT ran
    assert (runs / "pre" / "checkpoints" / "step-000001" / "adapter_model.safetensors").is_file()
