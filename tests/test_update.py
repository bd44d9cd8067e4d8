"""The update step in one process: metrics that do not depend on gradient accumulation, a logged loss that is
the loss, bf16 with fp32 master weights at lr 1e-6, atomic skipped updates, the non-finite weights guard,
and the sampler/trainer mismatch with truncated importance sampling."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from test_trainer_learns import WORDS, AppleEnv
from treegrpo.advantage import compute_advantages
from treegrpo.build import RunParts
from treegrpo.config import load_config
from treegrpo.distributed import DistContext
from treegrpo.models import tiny_causal_lm
from treegrpo.packing import forward_logprobs, pack, packed_loss
from treegrpo.tokenizer import train_tokenizer
from treegrpo.trainer import Trainer
from treegrpo.tree import leaf_arrays
from treegrpo.update import attach_advantages

ROWS = [{"question": "q", "golden_answers": ["apple"], "group_id": f"g/{i}"} for i in range(16)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([" ".join(WORDS), "name a fruit ok"], kind="wordlevel")


def _trainer(tmp_path: Path, tok, model, *sets: str) -> Trainer:
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "policy.max_new_tokens=4",
            "trainer.prompts_per_step=8",
            "trainer.eval_every=0",
            *sets,
        ],
    )
    return Trainer(cfg, RunParts(model, tok, AppleEnv(), ROWS, []), tmp_path / "run", DistContext())


def assert_same_adam_steps(a: torch.Tensor, b: torch.Tensor, name: str = "", lr: float = 0.01) -> None:
    """Weights after the same two Adam steps, reached through differently batched (fp32-rounded) gradients.

    Adam's first steps are lr·g/(|g| + eps): a gradient element near eps turns rounding noise into a move of
    up to lr. So all but a few elements (≤ 0.1%) must agree to 2e-5, and none may differ by more than the
    two steps' largest possible move, 2·lr.
    """
    diff = (a - b).detach().abs()
    off = int((diff > 2e-5 + 1e-5 * b.detach().abs()).sum())
    assert off <= max(1, diff.numel() // 1000), (name, off, float(diff.max()))
    assert float(diff.max()) <= 2 * lr, (name, float(diff.max()))


def _batch(trainer: Trainer):
    """One rollout with non-trivial advantages on every leaf."""
    forests, _, _ = trainer.rollout()
    r, g, t = leaf_arrays(forests)
    adv = compute_advantages(np.asarray(r) + np.linspace(0, 1, len(r)), g, t)
    return forests, attach_advantages(forests, adv)


LOSS_SETS = (
    "trainer.beta=0.05",
    "trainer.entropy_coeff=0.01",
    "trainer.lr=0.01",
    "trainer.mini_batch_prompts=4",
)


def test_metrics_are_the_same_for_1_and_4_accumulation_steps(tmp_path: Path, tok) -> None:
    model = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=5)
    a = _trainer(
        tmp_path / "a", tok, copy.deepcopy(model), *LOSS_SETS, "trainer.gradient_accumulation_steps=1"
    )
    b = _trainer(
        tmp_path / "b", tok, copy.deepcopy(model), *LOSS_SETS, "trainer.gradient_accumulation_steps=4"
    )
    forests, per_tree = _batch(a)
    ma, mb = a.train_on(forests, per_tree), b.train_on(forests, per_tree)
    assert ma["updates"] == mb["updates"] == 2
    # The second mini-batch is trained after one step, so KL, clipping and ratios are all non-trivial.
    assert ma["kl"] > 1e-6 and ma["entropy"] > 0.1 and ma["approx_kl"] != 0.0
    for k in (
        "loss",
        "pg_loss",
        "kl",
        "entropy",
        "clipfrac",
        "approx_kl",
        "ratio_mean",
        "ratio_max",
        "grad_norm",
    ):
        assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-7), k
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert_same_adam_steps(pa, pb)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_logged_loss_is_the_loss(tmp_path: Path, tok, mode: str) -> None:
    model = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=6)
    sets = ("trainer.beta=0.05", "trainer.entropy_coeff=0.01", f"trainer.loss_agg_mode={mode}")
    t = _trainer(tmp_path, tok, copy.deepcopy(model), *sets, "trainer.gradient_accumulation_steps=3")
    m = t.train_step()
    c, beta = 0.01, 0.05
    assert m["loss"] == pytest.approx(
        m["pg_loss"] - c * m["train/entropy_loss"] + beta * m["train/kl_loss"], abs=1e-6
    )
    if mode == "token-mean":  # the weights sum to 1, so the loss terms are the logged means
        assert m["loss"] == pytest.approx(m["pg_loss"] - c * m["entropy"] + beta * m["kl"], abs=1e-6)
    # ... and it is the loss of the whole batch in one piece (it once was logged twice over).
    t2 = _trainer(tmp_path / "2", tok, copy.deepcopy(model), *sets, "trainer.gradient_accumulation_steps=3")
    forests, per_tree = _batch(t2)
    trees = [tr for f in forests for tr in f.trees]
    advs = [float(x) for a in per_tree for x in a]
    batch = pack(trees, advs, loss_agg_mode=mode, norm_length=t2.loss_cfg.norm_length)
    with torch.no_grad():
        ref, _ = forward_logprobs(t2.model, batch, t2.temperature, compute_entropy=False)
        whole, _ = packed_loss(t2.model, batch, t2.loss_cfg, ref, t2.temperature, on_policy=True)
    logged = t2.train_on(forests, per_tree)
    assert logged["loss"] == pytest.approx(float(whole), abs=1e-6)
    assert logged["kl"] == pytest.approx(0.0, abs=1e-9)  # the reference is the starting policy


def test_bf16_master_weights_move_at_lr_1e6(tmp_path: Path, tok, monkeypatch) -> None:
    base = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=3).to(torch.bfloat16)
    start = {k: v.float() for k, v in base.state_dict().items()}
    sets = ("model.dtype=bfloat16", "trainer.lr=1e-6", "trainer.beta=0.0", "trainer.entropy_coeff=0.0")
    t = _trainer(tmp_path / "fp32", tok, copy.deepcopy(base), *sets)
    assert {p.dtype for p in t.model.parameters()} == {torch.float32}  # master weights
    forests, per_tree = _batch(t)

    def changed(model: torch.nn.Module, view: torch.dtype) -> float:
        sd = model.state_dict()
        n = sum(int((sd[k].to(view).float() != v).sum()) for k, v in start.items())
        return n / sum(v.numel() for v in start.values())

    t.train_on(forests, per_tree)
    assert changed(t.model, torch.float32) > 0.95  # one step moves (nearly) every master weight ...
    assert changed(t.model, torch.bfloat16) < 0.2  # ... by less than bf16 can show
    # Plain AdamW on bf16 weights (what the trainer did before): the same steps mostly round to nothing.
    import treegrpo.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "place_model", lambda m, d: m.to(d))
    plain = _trainer(tmp_path / "bf16", tok, copy.deepcopy(base), *sets)
    assert {p.dtype for p in plain.model.parameters()} == {torch.bfloat16}
    for _ in range(40):
        t.train_on(forests, per_tree)
        plain.train_on(forests, per_tree)
    stuck, moved = changed(plain.model, torch.bfloat16), changed(t.model, torch.bfloat16)
    assert moved > 0.5 and moved > 3 * stuck, (moved, stuck)  # after enough steps the bf16 view moves


def test_a_non_finite_mini_batch_skips_only_its_own_optimizer_step(tmp_path: Path, tok, monkeypatch) -> None:
    import treegrpo.update as upd

    model = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=7)
    t = _trainer(
        tmp_path, tok, model, "trainer.mini_batch_prompts=4", "trainer.gradient_accumulation_steps=2"
    )
    forests, per_tree = _batch(t)
    calls = {"n": 0}
    real = upd.micro_loss

    def poisoned(*args, **kwargs):
        loss, m, s = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 2 else loss), m, s  # mini-batch 2 (micro 3, 4)

    steps = {"n": 0}
    real_step = t.optimizer.step

    def counting_step(*a, **k):
        steps["n"] += 1
        return real_step(*a, **k)

    monkeypatch.setattr(upd, "micro_loss", poisoned)
    monkeypatch.setattr(t.optimizer, "step", counting_step)
    before = [p.detach().clone() for p in t.model.parameters()]
    m = t.train_on(forests, per_tree)
    assert (m["updates"], m["skipped_updates"]) == (1.0, 1.0)
    assert steps["n"] == 1 and t.scheduler.last_epoch == 2  # schedule advances with the plan
    assert all(p.grad is None for p in t.model.parameters())  # the poisoned gradients were dropped
    assert any(not torch.equal(a, p) for a, p in zip(before, t.model.parameters(), strict=True))
    assert np.isfinite(m["loss"]) and all(torch.isfinite(p).all() for p in t.model.parameters())


def test_non_finite_weights_stop_the_run_with_exit_2_and_no_checkpoint(
    tiny_config: Path, monkeypatch, capsys
) -> None:
    import yaml

    import treegrpo.trainer as trainer_mod
    from treegrpo.cli import main

    real_init = trainer_mod.Trainer.__init__

    def init_then_poison_the_optimizer(self, *a, **k):  # the trainer's optimizer only, not the warm start's
        real_init(self, *a, **k)
        real_step = self.optimizer.step

        def step(*sa, **sk):
            out = real_step(*sa, **sk)
            with torch.no_grad():
                self.optimizer.param_groups[0]["params"][0].fill_(float("inf"))
            return out

        self.optimizer.step = step

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", init_then_poison_the_optimizer)
    code = main(["train", "--config", str(tiny_config), "--no-progress", "--set", "name=poison",
                 "--set", "trainer.save_every=1", "--set", "trainer.eval_every=0"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "not finite after an optimizer step" in errors[0], err
    assert "Traceback" not in err
    run = Path(yaml.safe_load(tiny_config.read_text())["output_dir"]) / "poison"
    assert not list(run.glob("checkpoints/step-*"))  # nothing saved from the poisoned state


def test_sampler_mismatch_and_truncated_importance_sampling(tmp_path: Path, tok) -> None:
    model = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=8)
    sets = ("trainer.beta=0.0", "trainer.entropy_coeff=0.0")
    t = _trainer(tmp_path / "a", tok, copy.deepcopy(model), *sets)
    forests, per_tree = _batch(t)
    m = t.train_on(copy.deepcopy(forests), per_tree)
    assert m["logprob_mismatch"] < 1e-4  # the hf sampler and the trainer agree (same model, fp32)
    # A sampler that reports log-probs 0.1 nat too low: mismatch 0.1, trainer/sampler ratio e^0.1.
    shifted = copy.deepcopy(forests)
    for f in shifted:
        for tr in f.trees:
            for n in tr.nodes[1:]:
                n.logprobs = [x - 0.1 for x in n.logprobs]
    off = _trainer(tmp_path / "b", tok, copy.deepcopy(model), *sets).train_on(
        copy.deepcopy(shifted), per_tree
    )
    assert off["logprob_mismatch"] == pytest.approx(0.1, abs=2e-4)
    assert off["logprob_ratio_max"] == pytest.approx(np.exp(0.1), rel=1e-3)
    assert off["pg_loss"] == pytest.approx(m["pg_loss"], abs=1e-6)  # off by default: the loss is unchanged
    # The same from the recomputed old log-probs when the step has several mini-batches.
    two = _trainer(tmp_path / "e", tok, copy.deepcopy(model), *sets, "trainer.mini_batch_prompts=4")
    assert not two.on_policy
    several = two.train_on(copy.deepcopy(shifted), per_tree)
    assert several["logprob_mismatch"] == pytest.approx(0.1, abs=2e-4)
    # TIS with cap 1.05 < e^0.1: every token's policy-gradient weight is exactly 1.05.
    tis = _trainer(tmp_path / "c", tok, copy.deepcopy(model), *sets, "trainer.tis_cap=1.05")
    capped = tis.train_on(copy.deepcopy(shifted), per_tree)
    assert capped["pg_loss"] == pytest.approx(1.05 * m["pg_loss"], rel=1e-4)
    wide = _trainer(tmp_path / "d", tok, copy.deepcopy(model), *sets, "trainer.tis_cap=2.0")
    uncapped = wide.train_on(copy.deepcopy(shifted), per_tree)
    assert uncapped["pg_loss"] == pytest.approx(np.exp(0.1) * m["pg_loss"], rel=1e-3)


class RecordingDist(DistContext):
    """A rank of a pretend world: records every collective instead of running it (identity results)."""

    def __init__(self, world: int, rank: int) -> None:
        super().__init__(world=world, rank=rank)
        self.trace: list[tuple] = []

    def _reduce(self, values, op):  # noqa: ANN001, ANN202
        self.trace.append(("reduce", str(op), len(values)))
        return [float(v) for v in values]

    def all_true(self, flag: bool) -> bool:
        self.trace.append(("all_true",))
        return flag

    def all_reduce_gradients(self, params) -> None:  # noqa: ANN001
        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.trace.append(("grads", len(params), sum(p.numel() for p in params)))

    def union(self, keys):  # noqa: ANN001, ANN201
        self.trace.append(("union",))
        return sorted(set(keys))

    def barrier(self) -> None:
        self.trace.append(("barrier",))

    def broadcast_parameters(self, module) -> None:  # noqa: ANN001
        self.trace.append(("broadcast",))


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_runs_the_same_collectives_whatever_its_trees(tmp_path: Path, tok, world: int) -> None:
    """The per-rank shares differ wildly (one huge tree; with 3 ranks one rank has no tree in the second
    mini-batch), yet every rank issues the same collectives in the same order: nothing can pair up wrongly."""
    model = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=9)
    sets = (
        "trainer.prompts_per_step=6",
        "trainer.mini_batch_prompts=4",
        "trainer.gradient_accumulation_steps=2",
    )
    probe = _trainer(tmp_path / "probe", tok, copy.deepcopy(model), *sets)
    forests, per_tree = _batch(probe)
    tree = forests[0].trees[0]
    tree.root.token_ids = tree.root.token_ids * 20
    per_forest, k = [], 0
    for f in forests:
        per_forest.append(per_tree[k : k + len(f.trees)])
        k += len(f.trees)
    traces = []
    for rank in range(world):
        dist = RecordingDist(world, rank)
        cfg = load_config(
            None, [f"output_dir={tmp_path}", "policy.max_new_tokens=4", "trainer.eval_every=0", *sets]
        )
        t = Trainer(
            cfg, RunParts(copy.deepcopy(model), tok, AppleEnv(), ROWS, []), tmp_path / f"r{rank}", dist
        )
        mine = [a for fa in per_forest[rank::world] for a in fa]
        m = t.train_on(copy.deepcopy(forests[rank::world]), mine)
        assert m["updates"] == 2
        traces.append(dist.trace)
    assert all(tr == traces[0] for tr in traces), traces
    assert sum(1 for c in traces[0] if c[0] == "grads") == 2  # one gradient all-reduce per optimizer step


@pytest.mark.parametrize(
    "packing", ["trainer.packing=path", "trainer.max_tokens_per_row=64", "trainer.logits_chunk=3"]
)
def test_every_packing_mode_trains_like_leaf_packing(tmp_path: Path, tok, packing: str) -> None:
    """Through the trainer's own update (mini-batches, KL, entropy, accumulation): the parameters after
    the step and the logged loss equal leaf packing's — the path mode's in-loss backward included."""
    model = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=5)
    sets = (*LOSS_SETS, "trainer.gradient_accumulation_steps=2")
    leaf = _trainer(tmp_path / "leaf", tok, copy.deepcopy(model), *sets, "trainer.packing=leaf")
    other = _trainer(tmp_path / "other", tok, copy.deepcopy(model), *sets, packing)
    forests, per_tree = _batch(leaf)
    m_leaf, m_other = leaf.train_on(forests, per_tree), other.train_on(forests, per_tree)
    assert m_other["updates"] == m_leaf["updates"] == 2
    for k in ("loss", "pg_loss", "kl", "entropy"):
        assert m_other[k] == pytest.approx(m_leaf[k], rel=1e-5, abs=1e-7), k
    for (name, p), q in zip(leaf.model.named_parameters(), other.model.parameters(), strict=True):
        assert_same_adam_steps(p, q, name)
    moved = sum(
        float((p - q).detach().abs().sum())
        for p, q in zip(leaf.model.parameters(), model.parameters(), strict=True)
    )
    assert moved > 1e-3  # the step really changed the weights
