"""The Search-R1 recipe says what the paper ran, and its batch plan divides evenly over 8 GPUs."""

from __future__ import annotations

from pathlib import Path

from treegrpo.config import load_config
from treegrpo.update import plan_mini_batches, updates_per_step

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "search_r1_qwen2.5_3b.yaml"


def test_recipe_uses_the_paper_settings() -> None:
    cfg = load_config(RECIPE)
    assert cfg.policy.top_p == 0.95 and cfg.env.max_turns == 3 and cfg.env.topk == 3
    assert (cfg.rollout.m, cfg.rollout.n, cfg.rollout.l) == (2, 2, 1)
    tc = cfg.trainer
    assert (tc.prompts_per_step, tc.mini_batch_prompts, tc.lr, tc.beta, tc.steps) == (
        512,
        64,
        1e-6,
        0.001,
        1005,
    )
    assert tc.warmup_steps == int(0.285 * tc.steps)  # Search-R1's lr_warmup_steps_ratio
    assert cfg.model.dtype == "bfloat16"  # fp32 masters, bf16 compute


def test_recipe_batch_plan_on_8_gpus() -> None:
    tc = load_config(RECIPE).trainer
    assert updates_per_step(tc.prompts_per_step, tc.mini_batch_prompts, tc.ppo_epochs) == 8
    for rank in range(8):
        groups = plan_mini_batches(
            tc.prompts_per_step // 8, rank, 8, tc.prompts_per_step, tc.mini_batch_prompts
        )
        assert [len(g) for g in groups] == [8] * 8  # 8 forests per rank and mini-batch
    assert tc.gradient_accumulation_steps == 8  # one forest per micro-batch
