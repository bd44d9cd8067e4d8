"""Config: validation names the bad field, CLI exits 2 with one line, overrides and presets work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from treegrpo.cli import main
from treegrpo.config import ConfigError, load_config, preset_names


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("rollout.m=0", "rollout.m"),
        ("rollout.n=-1", "rollout.n"),
        ("rollout.l=-2", "rollout.l"),
        ("env.max_turns=0", "env.max_turns"),
        ("trainer.lr=fast", "trainer.lr"),
        ("trainer.bogus=1", "trainer.bogus"),
        ("trainer.loss_agg_mode=mean", "trainer.loss_agg_mode"),
        ("rollout.strategy=bfs", "rollout.strategy"),
        ("advantage.estimator=ppo", "advantage.estimator"),
        ("policy.top_p=1.5", "policy.top_p"),
        ("trainer.steps=2.5", "trainer.steps"),
        ("warmstart.enabled=maybe", "warmstart.enabled"),
    ],
)
def test_bad_value_exits_2_with_one_line_naming_the_field(override, field, capsys):
    code, out, err = _run_cli(["config", "show", "--set", override], capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert field in lines[0]
    assert "Traceback" not in err


def test_unknown_key_in_yaml_file(tmp_path: Path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"rollout": {"mm": 3}}))
    code, _, err = _run_cli(["config", "show", "--config", str(p)], capsys)
    assert code == 2 and "rollout.mm" in err and "unknown key" in err


def test_malformed_yaml_and_missing_file(tmp_path: Path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("rollout: [1, 2\n")
    code, _, err = _run_cli(["config", "show", "--config", str(p)], capsys)
    assert code == 2 and str(p) in err
    code, _, err = _run_cli(["config", "show", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "not found" in err


def test_overrides_reach_the_config_and_show_prints_yaml(capsys):
    code, out, _ = _run_cli(["config", "show", "--set", "rollout.m=4", "--set", "trainer.lr=1e-5"], capsys)
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["rollout"]["m"] == 4
    assert shown["trainer"]["lr"] == pytest.approx(1e-5)
    cfg = load_config(None, ["rollout.strategy=chain", "rollout.num_generations=6"])
    assert cfg.rollout.group_size == 6


def test_presets_all_load_and_validate():
    assert {"quickstart", "smollm2"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(preset=name)
        assert cfg.name


def test_gpu_recipe_config_validates():
    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.trainer.steps > 0, path


def test_impossible_group_size_rejected():
    with pytest.raises(ConfigError, match="rollout.m"):
        load_config(None, ["rollout.m=1", "rollout.n=0"])


def test_debug_flag_shows_the_traceback():
    with pytest.raises(ConfigError):
        main(["--debug", "config", "show", "--set", "rollout.m=0"])


@pytest.mark.parametrize("fast, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_is_resolved_from_the_hardware(monkeypatch, fast, expected):
    """`model.dtype: auto` becomes bf16 only where bf16 matmuls are fast; the config holds the real dtype."""
    import treegrpo.precision as precision

    monkeypatch.setattr(precision, "fast_bf16", lambda: fast)
    cfg = load_config(overrides=["model.dtype=auto"])
    assert cfg.model.dtype == expected
    assert f"dtype: {expected}" in cfg.to_yaml()


def test_fast_bf16_reads_the_cpu_flags(monkeypatch):
    import torch

    import treegrpo.precision as precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert precision.fast_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert precision.fast_bf16() is True


def test_async_rollouts_need_a_server_backend_and_a_staleness_bound():
    with pytest.raises(ConfigError, match=r"trainer.async_rollouts: 1 needs policy.backend 'openai'.*'hf'"):
        load_config(None, ["trainer.async_rollouts=1"])
    served = ["trainer.async_rollouts=1", "policy.backend=openai", "policy.base_url=http://127.0.0.1:9"]
    with pytest.raises(ConfigError, match=r"trainer.max_staleness: 0 refuses every one-step-off rollout"):
        load_config(None, [*served, "trainer.max_staleness=0"])
    assert load_config(None, served).trainer.async_rollouts == 1
    with pytest.raises(ConfigError, match="trainer.async_rollouts"):
        load_config(None, ["trainer.async_rollouts=2"])
