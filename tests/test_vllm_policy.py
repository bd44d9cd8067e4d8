"""VLLMPolicy: the CPU-checkable parts here always; the engine tests on a CUDA machine with vLLM installed.

On a machine without vLLM / a GPU the engine tests skip with the reason. What always runs: the install
hint when vLLM is missing (constructor, `make_policy`, CLI), the weight export the engine receives (plain
and LoRA-merged, without mutating the trainer's model), and the route `push_weights` takes through the
engine objects of the vLLM versions we know.
"""

from __future__ import annotations

import copy
import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from treegrpo.models import tiny_causal_lm
from treegrpo.policies.vllm import VLLMPolicy, VLLMUnavailable, engine_weights, push_weights
from treegrpo.protocols import StepResult
from treegrpo.tokenizer import train_tokenizer
from treegrpo.tree import ActionKind

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_GPU = torch.cuda.is_available()
needs_engine = pytest.mark.skipif(
    not (HAS_VLLM and HAS_GPU),
    reason="vLLM engine tests need `pip install treegrpo[vllm]` and a CUDA GPU "
    f"(vllm installed: {HAS_VLLM}, cuda available: {HAS_GPU})",
)

WORDS = "who founded the company ? search answer the fox jumps over a lazy dog . where when what city"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([WORDS])


# -- always (CPU) ------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_VLLM, reason="checks the message shown when vLLM is missing")
def test_missing_vllm_is_a_clear_error(tok, tiny_config, capsys):
    with pytest.raises(VLLMUnavailable, match=r"pip install 'treegrpo\[vllm\]'"):
        VLLMPolicy("/nonexistent", tok)
    from treegrpo.cli import main

    rc = main(["eval", "--config", str(tiny_config), "--backend", "vllm"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: policy.backend: vllm needs the optional extra")


def test_engine_weights_plain_model_are_its_checkpoint(tok):
    m = tiny_causal_lm(tok, hidden=32, layers=1, heads=4)
    w = dict(engine_weights(m))
    sd = m.state_dict()
    assert set(w) == set(sd)
    assert all(torch.equal(w[k], sd[k]) for k in sd)
    ddp = torch.nn.Module()  # accelerate / DDP keep the model at `.module`
    ddp.module = m
    assert set(dict(engine_weights(ddp))) == set(sd)


def test_engine_weights_merge_lora_without_touching_the_model(tok):
    from peft import LoraConfig, get_peft_model

    base = tiny_causal_lm(tok, hidden=32, layers=1, heads=4)
    names = set(base.state_dict())
    p = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, t in p.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(t)
    before = {k: v.clone() for k, v in p.state_dict().items()}
    w = dict(engine_weights(p))
    assert set(w) == names  # base checkpoint names only: no lora_A/B, no base_model.model. prefix
    merged = copy.deepcopy(p).merge_and_unload().state_dict()
    for k in names:
        torch.testing.assert_close(w[k], merged[k])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(w[q], before[f"base_model.model.{q.replace('.weight', '.base_layer.weight')}"])
    assert all(torch.equal(v, before[k]) for k, v in p.state_dict().items())  # nothing merged in place
    p.base_model.disable_adapter_layers()  # disabled adapters push the plain base weights
    torch.testing.assert_close(
        dict(engine_weights(p))[q], before[f"base_model.model.{q[:-7]}.base_layer.weight"]
    )


class _Recorder:
    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.resets = 0

    def load_weights(self, weights):
        self.loaded = [n for n, _ in weights]


def test_push_weights_routes(tok):
    weights = list(engine_weights(tiny_causal_lm(tok, hidden=32, layers=1, heads=4)))
    names = [n for n, _ in weights]
    # vLLM V1 with the engine core in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    target = _Recorder()
    llm = SimpleNamespace(
        llm_engine=SimpleNamespace(
            model_executor=SimpleNamespace(
                driver_worker=SimpleNamespace(
                    worker=SimpleNamespace(model_runner=SimpleNamespace(model=target))
                )
            )
        ),
    )
    resets = []
    llm.reset_prefix_cache = lambda: resets.append(1)
    assert push_weights(llm, weights).startswith("in-process")
    assert target.loaded == names and resets == [1]  # stale prefix KV dropped after every push
    # vLLM V0 layout
    target0 = _Recorder()
    llm0 = SimpleNamespace(
        llm_engine=SimpleNamespace(
            model_executor=SimpleNamespace(
                driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=target0))
            )
        )
    )
    push_weights(llm0, weights)
    assert target0.loaded == names
    # engine core in another process: the function travels through collective_rpc
    worker = SimpleNamespace(model_runner=SimpleNamespace(model=_Recorder()))
    llm_rpc = SimpleNamespace(collective_rpc=lambda fn: [fn(worker)])
    assert push_weights(llm_rpc, weights).startswith("collective_rpc")
    assert worker.model_runner.model.loaded == names
    with pytest.raises(VLLMUnavailable, match="cannot push trainer weights"):
        push_weights(SimpleNamespace(), weights)


# -- GPU + vLLM ---------------------------------------------------------------------------------------
class _Env:
    """Two searches then an answer; observations are fixed text."""

    def start(self, row):
        return (row["q"], 0), [{"role": "user", "content": row["q"]}]

    def step(self, states, actions):
        out = []
        for (q, n), _ in zip(states, actions, strict=True):
            last = n + 1 >= 3
            out.append(
                StepResult(
                    state=(q, n + 1),
                    observation="" if last else " the fox jumps over a lazy dog .",
                    done=last,
                    action=ActionKind.ANSWER if last else ActionKind.SEARCH,
                    tool_calls=int(not last),
                )
            )
        return out

    def reward(self, state):
        return float(state[1] == 3)


@pytest.fixture(scope="module")
def engine_setup(tok, tmp_path_factory):
    model = tiny_causal_lm(tok, hidden=256, layers=2, heads=4, seed=11).cuda()  # head_dim 64
    path = tmp_path_factory.mktemp("tiny-vllm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    pol = VLLMPolicy.for_model(
        model, path, tok, max_new_tokens=8, greedy=True, dtype="bfloat16", gpu_memory_utilization=0.25, seed=0
    )
    return model, pol


def _hf_logprobs(model, ctx, ids):
    x = torch.tensor([ctx + ids], device=model.device)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(ids) - 1, device=model.device)
    return logp[pos, torch.tensor(ids, device=model.device)].tolist()


@needs_engine
def test_tokens_in_tokens_out_and_logprobs(engine_setup, tok):
    model, pol = engine_setup
    ctx = pol.encode_prompt([{"role": "user", "content": "who founded the company ?"}])
    s = pol.generate([ctx, ctx[:5]])
    for c, step in zip([ctx, ctx[:5]], s, strict=True):
        assert 0 < len(step.token_ids) == len(step.logprobs) <= 8
        assert step.text == tok.decode(step.token_ids, skip_special_tokens=True)
        np.testing.assert_allclose(step.logprobs, _hf_logprobs(model, c, step.token_ids), atol=0.05)


@needs_engine
def test_tree_rollout_and_prefix_cache(engine_setup, tok):
    from treegrpo.rollout import RolloutConfig, sample_forests

    model, greedy = engine_setup
    pol = VLLMPolicy.for_model(model, "", tok, max_new_tokens=6, seed=1)
    assert pol.engine is greedy.engine  # one engine per live model
    rows = [{"q": WORDS}, {"q": "where is the city ? " + WORDS}]
    res = sample_forests(
        rows, ["a", "b"], pol, _Env(), RolloutConfig(m=2, n=2, l=1), np.random.default_rng(0)
    )
    assert res.budget["trajectories"] == 12
    for f in res.forests:
        for t in f.trees:
            for n in t.nodes[1:]:
                assert len(n.token_ids) == len(n.logprobs) > 0
    assert pol.stats["generated_tokens"] == res.budget["generated_tokens"]
    # expansions re-send contexts whose prefixes the engine has seen (prompts ≥ one 16-token KV block):
    # the engine reports cached tokens (vLLM V1 `num_cached_tokens`) and prefills less than it is sent
    sent = res.budget["prefill_tokens_no_reuse"]
    assert pol.stats["cached_tokens"] > 0
    assert res.budget["prefill_tokens_reported"] == sent - pol.stats["cached_tokens"]


@needs_engine
def test_weight_sync_follows_the_trainer(engine_setup, tok):
    model, pol = engine_setup
    ctx = tok.encode(" the fox jumps over a", add_special_tokens=False)
    before = pol.generate([ctx])[0]
    n_sync = pol.engine.syncs
    with torch.no_grad():  # an "optimizer step" that makes the distribution sharp and different
        model.get_input_embeddings().weight.mul_(-40.0)
    after = pol.generate([ctx])[0]  # live model changed → pushed before generating
    assert pol.engine.syncs == n_sync + 1
    want = _hf_logprobs(model, ctx, after.token_ids)
    np.testing.assert_allclose(after.logprobs, want, atol=0.1)
    assert np.mean(after.logprobs) > np.mean(before.logprobs) + 0.5  # the engine samples from the new weights
    with torch.no_grad():
        hf_greedy = model.generate(
            torch.tensor([ctx], device=model.device), max_new_tokens=len(after.token_ids), do_sample=False
        )[0, len(ctx) :].tolist()
    assert after.token_ids == hf_greedy
    pol.generate([ctx])
    assert pol.engine.syncs == n_sync + 1  # unchanged weights: no push
