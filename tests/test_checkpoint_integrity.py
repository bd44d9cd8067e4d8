"""Checkpoint integrity: a manifest of sizes and sha256, fallback past damaged checkpoints, finite state only.

- Every file of the newest checkpoint, truncated or with a flipped byte, makes `latest_checkpoint` skip
  it with a warning naming it; `train --resume` then continues from the previous checkpoint and its
  metrics equal an uninterrupted run's; `eval` falls back the same way.
- With no intact checkpoint left, `--resume` and `eval` print one line and exit 2.
- `save_checkpoint` refuses non-finite weights or optimizer state and leaves the directory untouched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from treegrpo.checkpoint import (
    MANIFEST,
    CheckpointError,
    NonFiniteStateError,
    TrainerState,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    nonfinite_tensors,
    save_checkpoint,
    verify_checkpoint,
)
from treegrpo.cli import main
from treegrpo.run_log import read_metrics

COMPARED = ("train/reward_mean", "loss", "budget/generated_tokens", "grad_norm")


class _Tokenizer:
    def save_pretrained(self, path: Path) -> None:
        (Path(path) / "tokenizer.json").write_text('{"model": "stub"}')


def _tiny_model_and_optimizer() -> tuple[LlamaForCausalLM, torch.optim.Optimizer]:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    return model, opt


def _save(root: Path, step: int, model, opt, keep_last: int = 5) -> Path:
    import numpy as np

    return save_checkpoint(
        root,
        step,
        model,
        _Tokenizer(),
        opt,
        None,
        np.random.default_rng(0),
        TrainerState(step, step, {}),
        keep_last,
    )


def _corrupt(path: Path, mode: str) -> None:
    data = path.read_bytes()
    if mode == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # flip one byte in the middle: same size, different content
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :])


def test_manifest_lists_every_file_and_each_damage_falls_back(tmp_path: Path) -> None:
    model, opt = _tiny_model_and_optimizer()
    root = tmp_path / "checkpoints"
    first, newest = _save(root, 1, model, opt), _save(root, 2, model, opt)
    manifest = json.loads((newest / MANIFEST).read_text())["files"]
    files = sorted(p.name for p in newest.iterdir() if p.name != MANIFEST)
    assert sorted(manifest) == files and "model.safetensors" in files and "trainer_state.pt" in files
    for name, entry in manifest.items():
        assert entry["size"] == (newest / name).stat().st_size
    assert verify_checkpoint(newest) is None and latest_checkpoint(root) == newest
    pristine = tmp_path / "pristine"
    shutil.copytree(newest, pristine)
    for name in [*files, MANIFEST]:
        for mode in ("truncate", "flip"):
            _corrupt(newest / name, mode)
            # a damaged manifest shows as a file that disagrees with it (or as unreadable)
            named = "" if name == MANIFEST else name
            with pytest.warns(UserWarning, match=rf"skipping damaged checkpoint .*step-000002: .*{named}"):
                assert latest_checkpoint(root) == first, (name, mode)
            shutil.copy2(pristine / name, newest / name)
    (newest / "trainer_state.pt").unlink()
    assert "trainer_state.pt is missing" in (verify_checkpoint(newest) or "")
    _corrupt(first / "model.safetensors", "flip")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no intact checkpoint left"):
        latest_checkpoint(root)


def test_checkpoint_without_manifest_is_verified_by_loading(tmp_path: Path) -> None:
    model, opt = _tiny_model_and_optimizer()
    root = tmp_path / "checkpoints"
    old = _save(root, 1, model, opt)
    (old / MANIFEST).unlink()  # as written by treegrpo before manifests
    assert verify_checkpoint(old) is None
    _corrupt(old / "model.safetensors", "truncate")
    assert "model.safetensors cannot be loaded" in (verify_checkpoint(old) or "")


def test_load_trainer_state_errors_name_the_file(tmp_path: Path) -> None:
    import numpy as np

    model, opt = _tiny_model_and_optimizer()
    ckpt = _save(tmp_path, 1, model, opt)
    _corrupt(ckpt / "trainer_state.pt", "truncate")
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: cannot be loaded"):
        load_trainer_state(ckpt, opt, None, np.random.default_rng(0))


def test_non_finite_state_is_never_written(tmp_path: Path) -> None:
    model, opt = _tiny_model_and_optimizer()
    root = tmp_path / "checkpoints"
    good = _save(root, 1, model, opt, keep_last=1)
    before = sorted(p.name for p in root.iterdir())
    assert nonfinite_tensors(model, opt) == []
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    assert nonfinite_tensors(model, opt) == ["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(NonFiniteStateError, match=r"step-000002: non-finite values in model\.layers\.0\.mlp"):
        _save(root, 2, model, opt, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == before  # no step-2, no temp dir, step-1 not pruned
    assert verify_checkpoint(good) is None
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 0.0
    param = model.lm_head.weight
    opt.state[param]["exp_avg_sq"][0, 0] = float("inf")
    assert nonfinite_tensors(model, opt) == ["optimizer.lm_head.weight.exp_avg_sq"]
    with pytest.raises(NonFiniteStateError, match="optimizer.lm_head.weight.exp_avg_sq"):
        _save(root, 2, model, opt, keep_last=1)
    assert [p.name for p in list_checkpoints(root)] == ["step-000001"]


# ---- end to end: resume and eval fall back ---------------------------------------------------------------
def _run_dir(cfg: Path, name: str) -> Path:
    return Path(yaml.safe_load(cfg.read_text())["output_dir"]) / name


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("error")]


def test_resume_and_eval_fall_back_past_each_damaged_file(tiny_config: Path, tmp_path: Path, capsys) -> None:
    base = ["train", "--config", str(tiny_config), "--no-progress", "--set", "trainer.save_every=1"]
    base += [
        "--set",
        "trainer.eval_every=0",
        "--set",
        "trainer.save_trees_every=0",
        "--set",
        "trainer.keep_last=3",
    ]
    assert main([*base, "--set", "name=full", "--set", "trainer.steps=3"]) == 0
    full = {r["step"]: r for r in read_metrics(_run_dir(tiny_config, "full"))}
    assert main([*base, "--set", "name=dmg", "--set", "trainer.steps=2"]) == 0
    run = _run_dir(tiny_config, "dmg")
    pristine = tmp_path / "pristine"
    shutil.copytree(run, pristine)
    newest = run / "checkpoints" / "step-000002"
    files = sorted(p.name for p in newest.iterdir())
    assert MANIFEST in files and "model.safetensors" in files and "trainer_state.json" in files
    for i, name in enumerate(files):
        mode = ("truncate", "flip")[i % 2]
        shutil.rmtree(run)
        shutil.copytree(pristine, run)
        _corrupt(run / "checkpoints" / "step-000002" / name, mode)
        named = "" if name == MANIFEST else name
        with pytest.warns(UserWarning, match=rf"skipping damaged checkpoint .*step-000002: .*{named}"):
            assert main([*base, "--set", "name=dmg", "--set", "trainer.steps=3", "--resume"]) == 0, name
        resumed = read_metrics(run)
        assert [r["step"] for r in resumed] == [1, 2, 3], (name, mode)
        for r in resumed:
            for key in COMPARED:
                assert r[key] == full[r["step"]][key], (name, mode, r["step"], key)
        assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step-000003"
    capsys.readouterr()

    # eval: the newest checkpoint is damaged → the previous one is evaluated
    evaluate = ["eval", "--config", str(tiny_config), "--set", "name=dmg"]
    _corrupt(run / "checkpoints" / "step-000003" / "model.safetensors", "truncate")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step-000003"):
        assert main(evaluate) == 0
    assert f"model: {run / 'checkpoints' / 'step-000002'}" in capsys.readouterr().out
    # a damaged checkpoint named with --checkpoint: one line naming the file, exit 2 (no silent fallback)
    named = ["eval", "--config", str(tiny_config), "--checkpoint", str(run / "checkpoints" / "step-000003")]
    assert main(named) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "step-000003: damaged (model.safetensors has" in errors[0], errors
    # none intact: one line, exit 2, for eval and for --resume
    for ckpt in list_checkpoints(run / "checkpoints"):
        _corrupt(ckpt / "trainer_state.json", "flip")
    for args in (evaluate, [*base, "--set", "name=dmg", "--set", "trainer.steps=4", "--resume"]):
        with pytest.warns(UserWarning):
            assert main(args) == 2
        errors = _error_lines(capsys.readouterr().err)
        assert len(errors) == 1 and "no intact checkpoint left" in errors[0], errors


def test_weights_made_non_finite_by_an_update_never_reach_a_checkpoint(
    tiny_config: Path, monkeypatch, capsys
) -> None:
    """A plug-in optimizer step that poisons one weight at step 2: the step is skipped (the trainer's
    guard) or the run stops with exit 2 (the checkpoint writer's refusal); no checkpoint holds inf/nan."""
    from safetensors.torch import load_file

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoning_step(self, *args, **kwargs):  # noqa: ANN001, ANN202
        out = real_step(self, *args, **kwargs)
        if self.defaults["lr"] != 2e-4:  # the warm start's optimizer, not the RL trainer's
            return out
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    args = ["train", "--config", str(tiny_config), "--no-progress", "--set", "name=poison"]
    args += ["--set", "trainer.save_every=1", "--set", "trainer.eval_every=0", "--set", "trainer.steps=3"]
    code = main([*args, "--set", "trainer.lr=2e-4"])
    err = capsys.readouterr().err
    assert calls["n"] >= 2 and code in (0, 2), err
    if code == 2:
        errors = _error_lines(err)
        # Either guard may stop it: the update's check of the weights after the optimizer step (it
        # fires first), or save_checkpoint's refusal to write non-finite state.
        assert len(errors) == 1, err
        assert (
            "not finite after an optimizer step" in errors[0]
            or "refusing to write checkpoint step-000002: non-finite values in" in errors[0]
        ), errors[0]
    ckpts = list_checkpoints(_run_dir(tiny_config, "poison") / "checkpoints")
    assert ckpts and ckpts[0].name == "step-000001"
    for ckpt in ckpts:
        assert verify_checkpoint(ckpt) is None
        for f in ckpt.glob("*.safetensors"):
            for name, t in load_file(str(f)).items():
                assert bool(torch.isfinite(t).all()), (ckpt.name, name)
        blob = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        for state in blob["optimizer"]["state"].values():
            for v in state.values():
                assert not isinstance(v, torch.Tensor) or bool(torch.isfinite(v).all()), ckpt.name
