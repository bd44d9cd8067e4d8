"""The run-loop hooks for training through policy servers: sync, staleness, metrics, one-step-off rollouts."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch

from policy_servers import serve_models
from treegrpo.models import tiny_causal_lm
from treegrpo.policies.routing import served_policy
from treegrpo.protocols import StepResult
from treegrpo.rollout import RolloutConfig, sample_forests
from treegrpo.served_training import OneStepOffRollouts, ServedTraining, logprob_mismatch_metric
from treegrpo.tokenizer import train_tokenizer
from treegrpo.tree import ActionKind
from treegrpo.weight_sync import FullWeightSync, NoSync, StaleRolloutError, logprob_mismatch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["who founded the company ? search answer the fox jumps over a lazy dog ."])


@pytest.fixture(scope="module")
def model(tok):
    return tiny_causal_lm(tok, hidden=32, layers=1, heads=4, seed=5)


class _Env:
    def __init__(self, tok) -> None:
        self.tok = tok

    def start(self, row):
        return 0, self.tok.encode(row["q"], add_special_tokens=False)

    def step(self, states, actions):
        return [
            StepResult(
                state=n + 1,
                observation=" the fox ." if n < 1 else "",
                done=n >= 1,
                action=ActionKind.SEARCH if n < 1 else ActionKind.ANSWER,
            )
            for n, _ in zip(states, actions, strict=True)
        ]

    def reward(self, state):
        return 1.0


def test_logprob_mismatch_over_masked_tokens():
    a = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    b = torch.tensor([[-1.5, -2.0, -9.0], [-0.25, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert logprob_mismatch(a, b, mask) == pytest.approx((0.5 + 0.0 + 0.25) / 3)
    assert logprob_mismatch([], []) == 0.0
    with pytest.raises(ValueError, match="shape"):
        logprob_mismatch([1.0], [1.0, 2.0])

    class Batch:
        old_logprobs, loss_mask = a, mask

    assert logprob_mismatch_metric(Batch(), b) == {"train/logprob_mismatch": pytest.approx(0.25)}


def test_served_training_loop_sync_metrics_and_guard(model, tok, tmp_path):
    """The calls the run loop makes, in its order, against two real servers (full-weight sync)."""
    trainer = copy.deepcopy(model)
    rows = [{"q": q} for q in ("who founded the company ?", "the fox jumps", "over a lazy dog", "company ?")]
    cfg = RolloutConfig(strategy="random", m=2, n=2, l=1)
    with serve_models([model, model], tok) as servers:
        urls = ",".join(s.url for s in servers)
        pol = served_policy(urls, tok, seed=0, client_kwargs={"max_new_tokens": 4, "max_context": 2048})
        hooks = ServedTraining(pol, FullWeightSync(tmp_path / "sync", urls, pol), max_staleness=0)
        assert hooks.begin(trainer, 0) == 0
        for step in range(3):
            sample_forests(rows, list("abcd"), pol, _Env(tok), cfg, np.random.default_rng(step))
            m = hooks.rollout_metrics(trainer_version=step)
            assert m["train/staleness"] == 0.0 and 0.3 < m["rollout/server_prefix_hit"] < 1.0
            with torch.no_grad():  # the "update"
                for p in trainer.parameters():
                    p.add_(torch.randn_like(p) * 0.01)
            assert hooks.after_update(trainer, step + 1) == step + 1
            assert all(s.engine.version == step + 1 for s in servers)
        stale = ServedTraining(pol, NoSync(pol.version), max_staleness=1)
        sample_forests(rows, list("abcd"), pol, _Env(tok), cfg, np.random.default_rng(9))
        with pytest.raises(StaleRolloutError, match="2 versions old"):
            stale.rollout_metrics(trainer_version=5)


def test_one_step_off_overlaps_and_propagates_errors():
    started: dict[int, float] = {}
    release = threading.Event()

    def sample(step: int) -> int:
        started[step] = time.monotonic()
        if step == 3:
            raise RuntimeError("server went away")
        if step == 1:
            release.wait(5)
        return step * 10

    ahead = OneStepOffRollouts(sample, last_step=3)
    try:
        assert ahead.get(0) == 0
        ahead.prefetch(1)
        time.sleep(0.05)
        assert 1 in started and ahead.in_flight == [1]  # step 1 samples while step 0 "trains"
        release.set()
        assert ahead.get(1) == 10 and ahead.get(2) == 20
        ahead.prefetch(4)  # past last_step: nothing starts
        assert 4 not in started
        with pytest.raises(RuntimeError, match="went away"):
            ahead.get(3)
    finally:
        ahead.close()


def test_one_step_off_with_servers_has_staleness_one(model, tok, tmp_path):
    trainer = copy.deepcopy(model)
    rows = [{"q": q} for q in ("who founded the company ?", "the fox jumps")]
    cfg = RolloutConfig(strategy="random", m=2, n=1, l=1)
    with serve_models([model], tok) as servers:
        pol = served_policy(
            servers[0].url, tok, seed=0, client_kwargs={"max_new_tokens": 4, "max_context": 2048}
        )
        hooks = ServedTraining(pol, FullWeightSync(tmp_path / "s", servers[0].url, pol), max_staleness=1)
        hooks.begin(trainer, 0)
        ahead = OneStepOffRollouts(
            lambda step: sample_forests(rows, ["a", "b"], pol, _Env(tok), cfg, np.random.default_rng(step)),
            last_step=2,
        )
        lags = []
        try:
            for step in range(3):
                res = ahead.get(step)
                assert len(res.forests) == 2
                lags.append(hooks.rollout_metrics(trainer_version=step)["train/staleness"])
                ahead.prefetch(step + 1)  # sampled with the weights of `step` while step trains
                with torch.no_grad():
                    for p in trainer.parameters():
                        p.add_(torch.randn_like(p) * 0.01)
                while ahead.in_flight:  # "training" outlasts the rollout of the next step
                    time.sleep(0.01)
                hooks.after_update(trainer, step + 1)
        finally:
            ahead.close()
        assert lags[0] == 0.0 and lags[1:] == [1.0, 1.0]


def test_non_main_process_follows_the_main_ones_lora_sync(model, tok, tmp_path):
    """Two trainer processes, one server: only the main one saves/posts; the other switches its requests."""
    from peft import LoraConfig, get_peft_model

    from treegrpo.weight_sync import LoraSync

    torch.manual_seed(0)
    trainer = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False),
    )
    with serve_models([model], tok) as servers:
        url = servers[0].url
        kw = {"max_new_tokens": 4, "max_context": 2048, "greedy": True, "stop_strings": ()}
        main_pol, other_pol, greedy_pol = (served_policy(url, tok, client_kwargs=kw) for _ in range(3))
        main = ServedTraining(main_pol, LoraSync(tmp_path / "sync", url, main_pol), followers=[greedy_pol])
        other = ServedTraining(other_pol, LoraSync(tmp_path / "sync", url, other_pol))
        assert main.begin(trainer, 0) == 0 and other.begin(trainer, 0, is_main=False) == 0
        assert main.after_update(trainer, 1) == 1 and other.after_update(trainer, 1, is_main=False) == 1
        assert other_pol.model_name == main_pol.model_name == greedy_pol.model_name == "step-1"
        assert other_pol.version == greedy_pol.version == 1
        ctx = tok.encode("the fox", add_special_tokens=False)
        assert other_pol.generate([ctx])[0].token_ids == main_pol.generate([ctx])[0].token_ids
        assert servers[0].engine.stats["adapter_loads"] == 2  # step-0 and step-1, loaded once each
        assert other.rollout_metrics(trainer_version=1)["train/staleness"] == 0.0


def test_served_run_model_serves_exactly_the_trainers_model(tiny_config):
    """The helper for the training-through-serve-policy test: servers hold the model `train` builds."""
    from policy_servers import served_run_model
    from treegrpo.build import build_run
    from treegrpo.config import load_config
    from treegrpo.policies import HFPolicy
    from treegrpo.policies.routing import policy_for_config

    cfg = load_config(str(tiny_config))
    with served_run_model(cfg, n=2) as urls:
        served_cfg = load_config(
            str(tiny_config), ["policy.backend=openai", f"policy.base_url={','.join(urls)}"]
        )
        parts = build_run(served_cfg, log=lambda s: None)
        pol = policy_for_config(served_cfg, parts.tokenizer, 2048, greedy=True, seed=0)
        local = HFPolicy(parts.model, parts.tokenizer, greedy=True, max_new_tokens=cfg.policy.max_new_tokens)
        rows = parts.train_rows[:2]
        ctxs = [pol.encode_prompt(parts.env.start(r)[1]) for r in rows]
        got, want = pol.generate(ctxs), local.generate(ctxs)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert (
            logprob_mismatch([x for g in got for x in g.logprobs], [x for w in want for x in w.logprobs])
            < 1e-5
        )
        res = sample_forests(rows, ["a", "b"], pol, parts.env, served_cfg.rollout, np.random.default_rng(0))
        assert res.budget["trajectories"] == 2 * served_cfg.rollout.group_size


def test_prefix_hit_metric_waits_for_servers_that_report_it():
    class Counters:  # the two counters and the version ledger of a RoutedPolicy
        stats = {"prompt_tokens": 0, "prefill_tokens": 0}

        def take_versions(self):
            return [3]

    pol = Counters()
    hooks = ServedTraining(pol, NoSync(3), max_staleness=1)  # type: ignore[arg-type]
    pol.stats.update(prompt_tokens=100, prefill_tokens=100)  # nothing cached reported
    assert hooks.rollout_metrics(3) == {"train/staleness": 0.0}
    pol.stats.update(prompt_tokens=300, prefill_tokens=150)  # 200 new prompt tokens, 50 recomputed
    assert hooks.rollout_metrics(3) == {"train/staleness": 0.0, "rollout/server_prefix_hit": 0.75}


def test_closing_stops_an_in_flight_rollout_at_its_next_generation_call():
    """A stopping run does not wait for a whole one-step-off rollout: its next generate call raises."""
    from treegrpo.served_training import RolloutStopped, StoppablePolicy

    calls: list[int] = []

    class SlowPolicy:
        generator = "delegated"

        def generate(self, contexts):
            calls.append(len(contexts))
            time.sleep(0.05)
            return contexts

    ahead: OneStepOffRollouts[int] = OneStepOffRollouts(
        lambda step, pol: [pol.generate([1]) for _ in range(10_000)]
    )
    pol = StoppablePolicy(SlowPolicy(), ahead.stop)
    assert pol.generator == "delegated"
    ahead.prefetch(1, pol)
    time.sleep(0.2)
    fut = ahead._pending[1]
    t0 = time.monotonic()
    ahead.close()
    assert time.monotonic() - t0 < 2.0 and 1 <= len(calls) < 100
    with pytest.raises(RolloutStopped):
        fut.result()


def test_wait_blocks_until_the_prefetched_rollout_is_done():
    release = threading.Event()
    ahead = OneStepOffRollouts(lambda step: (release.wait(5), step)[1], last_step=5)
    try:
        assert ahead.wait(1) == 0.0  # nothing prefetched: nothing to wait for
        ahead.prefetch(1)
        threading.Timer(0.2, release.set).start()
        waited = ahead.wait(1)
        assert 0.1 < waited < 5 and ahead.in_flight == [] and ahead.get(1) == 1
    finally:
        ahead.close()
