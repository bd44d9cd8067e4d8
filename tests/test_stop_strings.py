"""Environment-declared stop strings: every backend stops a step at the environment's own tags."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch

from treegrpo.models import tiny_causal_lm
from treegrpo.policies import HFPolicy
from treegrpo.protocols import env_stop_strings
from treegrpo.rollout import RolloutConfig, sample_forests
from treegrpo.tokenizer import train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from arith_env import ArithEnv  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TEXT = "What is 12 * 7 ? <calc> 12 * 7 </calc> <result> 84 </result> <answer> 84 28 4 </answer> Solve"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([TEXT, *ArithEnv().tokenizer_texts()])


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def memorize(tok, prompt, cont, steps=120):
    m = tiny_causal_lm(tok, hidden=32, layers=1, heads=4, seed=3)
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    x = torch.tensor([prompt + cont])
    for _ in range(steps):
        logp = torch.log_softmax(m(input_ids=x).logits[:, :-1], -1)
        nll = -logp.gather(-1, x[:, 1:, None])[0, len(prompt) - 1 :, 0]
        opt.zero_grad()
        nll.mean().backward()
        opt.step()
    return m


def test_env_stop_strings_declared_or_none():
    assert env_stop_strings(ArithEnv()) == ("</calc>", "</answer>")
    assert env_stop_strings(SimpleNamespace()) is None
    with pytest.raises(ValueError, match="sequence of strings"):
        env_stop_strings(SimpleNamespace(stop_strings="</calc>"))
    with pytest.raises(ValueError, match="non-empty"):
        env_stop_strings(SimpleNamespace(stop_strings=("</calc>", "")))


def test_hf_steps_end_at_the_env_tags(tok):
    """The issue's failure: with Search-R1's stops the step runs past </calc>; with the env's it ends there."""
    env = ArithEnv()
    row = {"question": "What is 12 * 7 ?", "golden_answers": ["84"]}
    _, prompt = env.start(row)
    pol = HFPolicy(tiny_causal_lm(tok, hidden=32, layers=1, heads=4), tok, greedy=True, max_new_tokens=20)
    p = pol.encode_prompt(prompt)
    cont = ids(tok, " <calc> 12 * 7 </calc> 4 <answer> 28 </answer>")
    pol.model = memorize(tok, p, cont)
    pol.clear_cache()
    assert pol.generate([p])[0].text == " <calc> 12 * 7 </calc> 4 <answer> 28 </answer>"
    cut = pol.generate([p], stop=env.stop_strings)[0]
    assert cut.text == " <calc> 12 * 7 </calc>" and cut.token_ids == ids(tok, " <calc> 12 * 7 </calc>")
    # through the tree sampler: it reads env.stop_strings, the observation is the real result
    res = sample_forests([row], ["g"], pol, env, RolloutConfig(strategy="chain", num_generations=1))
    tree = res.forests[0].trees[0]
    first = tree.nodes[1]
    assert first.text.endswith("</calc>") and "<answer>" not in first.text
    assert first.observation == "\n<result> 84 </result>\n"
    for node in tree.nodes[1:]:
        if "</calc>" in node.text:
            assert node.text.endswith("</calc>")


def test_vllm_passes_env_stops_to_the_engine(tok, monkeypatch):
    """Engine-free: the SamplingParams the engine gets carry the environment's stop strings."""
    from treegrpo.policies.vllm import VLLMPolicy

    seen: list[dict] = []
    fake = ModuleType("vllm")
    fake.SamplingParams = lambda **kw: seen.append(kw) or kw  # type: ignore[attr-defined]
    inputs = ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: prompt_token_ids  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    comp = SimpleNamespace(token_ids=[5], logprobs=[{5: SimpleNamespace(logprob=-0.1)}])
    llm = SimpleNamespace(
        generate=lambda prompts, params, use_tqdm: [SimpleNamespace(outputs=[comp])] * len(prompts)
    )
    pol = VLLMPolicy.__new__(VLLMPolicy)
    pol.vllm, pol.tokenizer, pol.live_model = fake, tok, None
    pol.greedy, pol.temperature, pol.top_p, pol.max_new_tokens, pol.max_context = True, 1.0, 1.0, 8, 64
    pol.entropy_topk, pol.stop_strings = 0, ("</search>", "</answer>")
    pol.engine = SimpleNamespace(llm=llm)
    pol.generator = SimpleNamespace(request_seeds=lambda n: list(range(n)))
    pol.stats = {"calls": 0, "cached_tokens": 0, "prefill_tokens": 0, "generated_tokens": 0}
    pol.generate([[1, 2]], stop=ArithEnv.stop_strings)
    pol.generate([[1, 2]])
    assert [s["stop"] for s in seen] == [["</calc>", "</answer>"], ["</search>", "</answer>"]]
    assert all(s["include_stop_str_in_output"] for s in seen)


def test_no_stop_strings_means_only_end_of_turn(tok):
    """`stop_strings = ()` (a chat tool env): the step runs to EOS / the budget, not to </answer>."""
    pol = HFPolicy(tiny_causal_lm(tok, hidden=32, layers=1, heads=4), tok, greedy=True, max_new_tokens=20)
    p = ids(tok, "What is 12 * 7 ? Solve")
    cont = ids(tok, " <answer> 84 </answer> 28 4")
    pol.model = memorize(tok, p, cont, steps=200)
    pol.clear_cache()
    assert pol.generate([p])[0].text == " <answer> 84 </answer>"
    assert pol.generate([p], stop=())[0].token_ids[: len(cont)] == cont
    assert np.isfinite(pol.generate([p], stop=())[0].logprobs).all()
