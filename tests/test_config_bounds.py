"""Config bounds and merge semantics: finite floats, a maximum on every count, a rollout memory check,
preset ← --config file ← --set, and task kwargs that stay with their task."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path

import pytest
import yaml

from treegrpo.cli import main
from treegrpo.config import ROLLOUT_BOUNDS, Config, ConfigError, load_config
from treegrpo.models import tiny_causal_lm
from treegrpo.rollout import RolloutConfig
from treegrpo.rollout_memory import (
    BUILT_MODEL_CONTEXT,
    HOST_BYTES_PER_TOKEN,
    PROMPT_TOKENS,
    estimate_rollout_memory,
    rollout_memory_problem,
)
from treegrpo.tasks import build_task


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _count_fields(cls: type = Config, prefix: str = "") -> dict[str, int]:
    """Every integer field of the config tree → its maximum (KeyError if one has none)."""
    out: dict[str, int] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, dotted = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.update(_count_fields(tp, f"{dotted}."))
        elif tp is int or int in typing.get_args(tp):
            meta = {**f.metadata, **(ROLLOUT_BOUNDS.get(f.name, {}) if cls is RolloutConfig else {})}
            out[dotted] = meta["max"]
    return out


# ---- finite floats ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["1e400", "inf", "-inf", "nan", ".inf", ".nan", "1" + "0" * 400])
def test_non_finite_floats_are_rejected_at_config_time(value: str, tiny_config: Path, capsys) -> None:
    code = main(["train", "--config", str(tiny_config), "--no-progress", "--set", f"trainer.lr={value}"])
    line = _one_error_line(capsys)
    assert code == 2 and line.startswith("error: trainer.lr: must be a finite number"), line
    out_dir = Path(yaml.safe_load(tiny_config.read_text())["output_dir"])
    assert not out_dir.exists()  # refused before the run directory (or a warm start) was written


def test_non_finite_float_in_a_yaml_file(tmp_path: Path, capsys) -> None:
    p = tmp_path / "c.yaml"
    for text, field in [
        ("policy:\n  temperature: .inf\n", "policy.temperature"),
        ("env:\n  retriever:\n    timeout: 1e400\n", "env.retriever.timeout"),
        ("rollout:\n  entropy_temperature: .nan\n", "rollout.entropy_temperature"),
    ]:
        p.write_text(text)
        assert main(["config", "show", "--config", str(p)]) == 2
        assert f"error: {field}: must be a finite number" in _one_error_line(capsys)


# ---- maxima -------------------------------------------------------------------------------------------
def test_every_count_field_has_a_maximum() -> None:
    fields = _count_fields()  # raises KeyError naming nothing if a field lacks one: keep this list complete
    for name in (
        "rollout.m",
        "rollout.n",
        "rollout.l",
        "rollout.num_generations",
        "trainer.prompts_per_step",
    ):
        assert name in fields
    for name in (
        "env.max_turns",
        "env.topk",
        "policy.max_new_tokens",
        "env.max_obs_tokens",
        "data.eval_size",
    ):
        assert name in fields
    assert "trainer.steps" in fields and "model.hidden_size" in fields and "warmstart.num_demos" in fields
    assert len(fields) >= 35, sorted(fields)


@pytest.mark.parametrize(("field", "maximum"), sorted(_count_fields().items()))
def test_every_count_field_at_ten_times_its_maximum_exits_2(field: str, maximum: int, capsys) -> None:
    assert main(["config", "show", "--set", f"{field}={10 * maximum}"]) == 2
    line = _one_error_line(capsys)
    assert line == f"error: {field}: must be <= {maximum}, got {10 * maximum}", line


@pytest.mark.parametrize(
    "field", ["trainer.steps", "data.eval_size", "trainer.keep_last", "rollout.max_waves"]
)
def test_the_maximum_itself_is_accepted(field: str) -> None:
    maximum = _count_fields()[field]
    cfg = load_config(None, [f"{field}={maximum}"])
    section, name = field.split(".")
    assert getattr(getattr(cfg, section), name) == maximum


# ---- rollout memory estimate --------------------------------------------------------------------------
def test_memory_estimate_of_the_quickstart() -> None:
    cfg = load_config()
    est = estimate_rollout_memory(cfg)
    tokens = PROMPT_TOKENS + (4 + 1) * (
        40 + 64
    )  # prompt + (max_turns + 1) x (max_new_tokens + max_obs_tokens)
    assert (est.trajectories, est.tokens_per_trajectory, est.widest_wave) == (32 * 6, tokens, 32 * 2 * 2)
    assert est.kv_bytes_per_token == 2 * 3 * 96 * 4  # K and V x layers x hidden x float32
    assert est.host_bytes == 32 * 6 * tokens * HOST_BYTES_PER_TOKEN
    assert est.generation_bytes == 128 * tokens * 2304
    assert rollout_memory_problem(cfg, limit_bytes=est.total_bytes) is None
    problem = rollout_memory_problem(cfg, limit_bytes=est.total_bytes - 1)
    assert problem is not None and "rollout.m=2 x (1 + rollout.n=2 x rollout.l=1)" in problem
    capped = estimate_rollout_memory(load_config(None, ["rollout.max_context_tokens=300"]))
    assert capped.tokens_per_trajectory == 300
    long_steps = estimate_rollout_memory(load_config(None, ["policy.max_new_tokens=4000"]))
    assert long_steps.tokens_per_trajectory == BUILT_MODEL_CONTEXT  # the built model's context cuts it
    assert inspect.signature(tiny_causal_lm).parameters["max_positions"].default == BUILT_MODEL_CONTEXT
    chain = load_config(None, ["rollout.strategy=chain", "rollout.num_generations=5"])
    assert estimate_rollout_memory(chain).trajectories == 32 * 5
    assert "rollout.num_generations=5" in (rollout_memory_problem(chain, limit_bytes=1) or "")
    vllm = load_config(None, ["policy.backend=vllm"])
    assert estimate_rollout_memory(vllm).generation_bytes == 0  # vLLM pages its own KV cache


def test_a_rollout_that_cannot_fit_is_refused_naming_the_fields(capsys) -> None:
    sets = ["rollout.m=256", "rollout.n=64", "rollout.l=32", "trainer.prompts_per_step=8192"]
    args = ["config", "show"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2  # each value is within its maximum; together they are petabytes
    line = _one_error_line(capsys)
    assert "a rollout step needs about" in line and "lower these fields" in line
    for s in sets:
        assert s in line, line


def test_presets_fit_on_a_small_machine() -> None:
    for preset in ("quickstart", "smollm2"):
        assert rollout_memory_problem(load_config(preset=preset), limit_bytes=2 * 2**30) is None


# ---- merge semantics -----------------------------------------------------------------------------------
def test_a_file_with_only_a_name_keeps_the_preset(tmp_path: Path) -> None:
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\n")
    cfg = load_config(p)
    assert (cfg.policy.temperature, cfg.trainer.steps, cfg.trainer.prompts_per_step) == (0.7, 30, 32)
    assert cfg.warmstart.num_demos == 2048 and cfg.name == "mine"
    assert cfg.to_dict() == load_config(None, ["name=mine"]).to_dict()
    assert load_config(p, preset="smollm2").to_dict() == load_config(None, ["name=mine"], "smollm2").to_dict()


def test_preset_then_file_then_set(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("trainer:\n  steps: 5\n  lr: 1.0e-4\npolicy:\n  temperature: 0.9\n")
    cfg = load_config(p, ["trainer.steps=7"])
    assert cfg.trainer.steps == 7  # --set over the file
    assert cfg.trainer.lr == 1e-4 and cfg.policy.temperature == 0.9  # the file over the preset
    assert cfg.trainer.prompts_per_step == 32 and cfg.policy.max_new_tokens == 40  # the preset elsewhere
    assert cfg.data.task_kwargs == {"seed": 0, "n_entities": 300, "max_hops": 3}


def test_preset_key_in_the_file_chooses_the_base(tmp_path: Path, capsys) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("preset: none\nname: bare\n")
    cfg = load_config(p)
    assert cfg.to_dict() == dataclasses.replace(Config(), name="bare").to_dict()
    p.write_text("preset: smollm2\n")
    assert load_config(p).model.path == "smollm2-135m-instruct"
    assert load_config(p, preset="quickstart").model.path == ""  # --preset wins over the file's key
    p.write_text("preset: nosuch\n")
    assert main(["config", "show", "--config", str(p)]) == 2
    assert "--preset nosuch: unknown preset" in _one_error_line(capsys)
    p.write_text("preset: [1]\n")
    with pytest.raises(ConfigError, match="preset: expected a preset name"):
        load_config(p)


def test_task_kwargs_stay_with_their_task(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.task=factbook"])
    assert cfg.data.task == "factbook" and cfg.data.task_kwargs == {}
    task = build_task(cfg.data.task, **cfg.data.task_kwargs)  # used to fail: unexpected 'n_entities'
    assert task.name == "factbook" and task.train_rows
    both = load_config(None, ["data.task_kwargs.seed=3", "data.task=factbook"])  # order does not matter
    assert both.data.task_kwargs == {"seed": 3}
    same = load_config(None, ["data.task=synthetic-kb", "data.task_kwargs.n_entities=50"])
    assert same.data.task_kwargs == {"seed": 0, "n_entities": 50, "max_hops": 3}  # same task: merged
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  task: factbook\n  task_kwargs: {seed: 4}\n")
    assert load_config(p).data.task_kwargs == {"seed": 4}
    assert load_config(p, ["data.task=synthetic-kb"]).data.task_kwargs == {}


def test_memory_estimate_reads_a_pretrained_models_shape(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 28,
                "num_attention_heads": 16,
                "num_key_value_heads": 2,
                "hidden_size": 2048,
                "max_position_embeddings": 1000,
            }
        )
    )
    cfg = load_config(None, [f"model.path={tmp_path}", "model.dtype=bfloat16", "policy.max_new_tokens=500"])
    est = estimate_rollout_memory(cfg)
    assert est.kv_bytes_per_token == 2 * 28 * 2 * (2048 // 16) * 2  # GQA: 2 KV heads of 128, bf16
    assert est.tokens_per_trajectory == 1000  # the model's context
    unknown = estimate_rollout_memory(load_config(None, ["model.path=some-hub-name"]))
    assert unknown.kv_bytes_per_token == 0 and unknown.generation_bytes == 0  # unknown: not counted
