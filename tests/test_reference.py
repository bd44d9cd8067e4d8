"""The KL reference and the no-grad scoring: made from the placed policy (its device and dtype), equal to the
warm-started policy (KL 0 at step 0 after a LoRA warm start), old/reference log-probs without dropout, and
sharded launchers refused with one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from test_trainer_learns import WORDS, AppleEnv
from treegrpo.advantage import compute_advantages
from treegrpo.build import RunParts
from treegrpo.config import load_config
from treegrpo.distributed import DistContext
from treegrpo.models import tiny_causal_lm
from treegrpo.packing import forward_logprobs, pack
from treegrpo.reference import reference_logprobs, reference_model
from treegrpo.run_log import read_metrics
from treegrpo.tokenizer import train_tokenizer
from treegrpo.trainer import Trainer
from treegrpo.tree import leaf_arrays
from treegrpo.update import MicroBatch, MiniBatch, Scoring, attach_advantages, score_micro_batches

ROWS = [{"question": "q", "golden_answers": ["apple"], "group_id": f"g/{i}"} for i in range(8)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([" ".join(WORDS), "name a fruit ok"], kind="wordlevel")


def _trainer(tmp_path: Path, tok, model, *sets: str) -> Trainer:
    cfg = load_config(
        None, [f"output_dir={tmp_path}", "policy.max_new_tokens=4", "trainer.prompts_per_step=4", *sets]
    )
    return Trainer(cfg, RunParts(model, tok, AppleEnv(), ROWS, []), tmp_path / "run", DistContext())


def test_reference_is_made_from_the_placed_policy(tmp_path: Path, tok, monkeypatch) -> None:
    import treegrpo.trainer as trainer_mod

    real = trainer_mod.place_model
    moved: list[torch.nn.Module] = []

    def place_on_a_distinguishable_device(model, device):
        # CPU has one device; a float64 cast stands in for the move, so a reference copied before the
        # placement (as the trainer once did, before `accelerator.prepare`) would still be float32.
        out = real(model, device).to(torch.float64)
        moved.append(out)
        return out

    monkeypatch.setattr(trainer_mod, "place_model", place_on_a_distinguishable_device)
    t = _trainer(
        tmp_path, tok, tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=1), "trainer.beta=0.01"
    )
    assert moved and t.model is moved[0]
    policy = {(p.device, p.dtype) for p in t.model.parameters()}
    ref = {(p.device, p.dtype) for p in t.ref_model.parameters()}
    assert policy == ref == {(torch.device("cpu"), torch.float64)}
    assert not any(p.requires_grad for p in t.ref_model.parameters()) and not t.ref_model.training


def test_bf16_reference_is_on_the_policy_device_in_the_compute_dtype(tmp_path: Path, tok) -> None:
    model = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=1).to(torch.bfloat16)
    t = _trainer(tmp_path, tok, model, "trainer.beta=0.01", "model.dtype=bfloat16")
    assert {p.dtype for p in t.model.parameters()} == {torch.float32}  # fp32 masters
    assert {p.dtype for p in t.ref_model.parameters()} == {torch.bfloat16}
    assert {p.device for p in t.ref_model.parameters()} == {p.device for p in t.model.parameters()}


def _lora(tok, seed: int):
    from peft import LoraConfig, get_peft_model

    base = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=seed)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def test_after_a_lora_warm_start_the_reference_is_the_warm_started_adapter(tmp_path: Path, tok) -> None:
    model = _lora(tok, seed=2)
    with torch.no_grad():  # a "warm start": the adapter has moved away from zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ref = reference_model(model, warm_started=True)
    assert ref is not None
    t = _trainer(tmp_path, tok, copy.deepcopy(model), "trainer.beta=0.01")
    forests, _, _ = t.rollout()
    trees = [tr for f in forests for tr in f.trees]
    r, g, tid = leaf_arrays(forests)
    adv = [float(x) for x in compute_advantages(np.asarray(r) + np.arange(len(r)) * 0.1, g, tid)]
    batch = pack(trees, adv)
    policy_lp, _ = forward_logprobs(model, batch, compute_entropy=False)
    torch.testing.assert_close(reference_logprobs(ref, model, batch, 1.0), policy_lp.detach(), atol=0, rtol=0)
    # The base with the adapter disabled (the reference before) is a different policy: KL would not be 0.
    base_lp = reference_logprobs(None, model, batch, 1.0)
    assert float((base_lp - policy_lp.detach()).abs()[batch.loss_mask].max()) > 1e-3
    # A fresh adapter needs no copy: the base is the starting policy.
    assert reference_model(_lora(tok, seed=2), warm_started=False) is None


def test_kl_is_zero_at_step_0_after_a_lora_warm_start(tiny_config: Path, tmp_path: Path) -> None:
    from treegrpo.cli import main
    from treegrpo.tasks import build_task

    task = build_task("synthetic-kb", seed=0, n_entities=40, max_hops=2)
    texts = [f"{d['title']} {d['text']}" for d in task.corpus] + [r["question"] for r in task.train_rows]
    texts += [s for d in task.demonstrations(n=64) for s in d.steps]
    tk = train_tokenizer(texts + ["Answer the question search information"], kind="wordlevel")
    path = tmp_path / "pretrained"
    tiny_causal_lm(tk, hidden=32, layers=1, heads=2).save_pretrained(path)
    tk.save_pretrained(path)
    args = ["train", "--config", str(tiny_config), "--no-progress", "--set", f"model.path={path}"]
    for s in ("model.lora=true", "model.lora_r=4", "warmstart.enabled=true", "warmstart.num_demos=8",
              "warmstart.epochs=2", "trainer.steps=2", "trainer.beta=0.01", "trainer.eval_every=0",
              "name=lora-kl"):  # fmt: skip
        args += ["--set", s]
    assert main(args) == 0
    run = Path(yaml.safe_load(tiny_config.read_text())["output_dir"]) / "lora-kl"
    assert json.loads((run / "summary.json").read_text())["warmstart_seconds"] > 0  # the SFT ran
    rows = {r["step"]: r for r in read_metrics(run)}
    assert rows[1]["kl"] == pytest.approx(0.0, abs=1e-9)  # step 1 is trained at the warm-started weights
    assert rows[2]["kl"] > 1e-9  # and the KL term is live once the policy moves


def test_old_and_reference_log_probs_are_computed_without_dropout(tmp_path: Path, tok) -> None:
    model = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=4)
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    t = _trainer(tmp_path, tok, model, "trainer.beta=0.01", "trainer.mini_batch_prompts=2")
    forests, _, _ = t.rollout()
    per_tree = attach_advantages(forests, compute_advantages(*leaf_arrays(forests)))
    trees = [tr for f in forests for tr in f.trees]
    batch = pack(trees, [float(x) for a in per_tree for x in a])
    model.train()
    noisy, _ = forward_logprobs(model, batch, t.temperature, compute_entropy=False)
    model.eval()
    clean, _ = forward_logprobs(model, batch, t.temperature, compute_entropy=False)
    model.train()
    assert float((noisy - clean).detach().abs().max()) > 1e-3  # dropout is really active in train mode
    minis = [MiniBatch([MicroBatch(batch)])]
    scoring = Scoring(temperature=t.temperature, beta=0.01, recompute_old=True)
    finite, _ = score_micro_batches(model, t.ref_model, minis, scoring, DistContext())
    assert finite and model.training  # train mode restored afterwards
    torch.testing.assert_close(minis[0].micro[0].batch.old_logprobs, clean.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(minis[0].micro[0].ref_logprobs, clean.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("ACCELERATE_USE_FSDP", "true", "accelerate FSDP: not supported"),
        ("ACCELERATE_USE_DEEPSPEED", "true", "accelerate DeepSpeed: not supported"),
        ("ACCELERATE_MIXED_PRECISION", "bf16", "set model.dtype: bfloat16"),
    ],
)
def test_sharded_or_accelerate_precision_launches_are_refused_with_one_line(
    tiny_config: Path, monkeypatch, capsys, var: str, value: str, says: str
) -> None:
    from treegrpo.cli import main

    monkeypatch.setenv(var, value)
    assert main(["train", "--config", str(tiny_config), "--no-progress", "--set", "name=sharded"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error") and says in lines[0], err


def test_pretrained_warm_start_runs_placed_with_fp32_masters_under_autocast(
    tmp_path: Path, monkeypatch
) -> None:
    import treegrpo.sft as sft
    from treegrpo.build import build_run
    from treegrpo.tasks import build_task

    task = build_task("synthetic-kb", seed=0, n_entities=20, max_hops=1)
    texts = [f"{d['title']} {d['text']}" for d in task.corpus] + [r["question"] for r in task.train_rows]
    tk = train_tokenizer(texts + [s for d in task.demonstrations(n=16) for s in d.steps], kind="wordlevel")
    path = tmp_path / "pretrained"
    tiny_causal_lm(tk, hidden=32, layers=1, heads=2).to(torch.bfloat16).save_pretrained(path)
    tk.save_pretrained(path)
    seen: dict[str, object] = {}

    def recording_warm_start(model, *a, **k):
        seen["dtypes"] = {p.dtype for p in model.parameters() if p.requires_grad}
        seen["devices"] = {p.device for p in model.parameters()}
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return sft.SFTStats(
            examples=0, steps=0, epochs=0, trained_tokens=0, total_tokens=0, loss_before=0, loss_after=0
        )

    monkeypatch.setattr(sft, "warm_start", recording_warm_start)
    sets = [f"model.path={path}", "model.dtype=bfloat16", "warmstart.enabled=true", "warmstart.num_demos=4"]
    sets += ["data.task_kwargs={seed: 0, n_entities: 20, max_hops: 1}", f"cache_dir={tmp_path / 'cache'}"]
    build_run(load_config(None, sets), log=lambda s: None, device=torch.device("cpu"))
    assert seen["dtypes"] == {torch.float32}  # the warm start updates fp32 master weights ...
    assert seen["autocast"] is True  # ... computing in bf16
    assert seen["devices"] == {torch.device("cpu")}  # on the device it was given
