"""Warm-start SFT: RL-time token layout, masked loss, seeded training, and a model that follows the protocol."""

from __future__ import annotations

import re

import pytest
import torch

from treegrpo.envs.search_r1 import SearchR1Env
from treegrpo.models import tiny_causal_lm
from treegrpo.retrievers import BM25Retriever
from treegrpo.sft import SFTExample, build_sft_examples, default_encoders, sft_loss, sft_train, warm_start
from treegrpo.tasks import Task, build_task
from treegrpo.tokenizer import train_tokenizer

TEMPLATE = "Answer with search. Question: {question}\n"
STEP_RE = re.compile(r"<think> [^<]+ </think>\n<search> [^<]+ </search>")


@pytest.fixture(scope="module")
def setup():
    # One intra-op thread: on these shared 2-core machines two threads contend and run ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    task = build_task("synthetic-kb", seed=0, n_entities=60, max_hops=2, n_train=32, n_eval=8)
    demos = task.demonstrations(early_stop_prob=0.3, seed=0)
    texts = [d["text"] for d in task.corpus] + [r["question"] for r in task.train_rows + task.eval_rows]
    texts += [s for d in demos for s in d.steps] + [TEMPLATE, "<information>Doc 1(Title: X) y</information>"]
    tok = train_tokenizer(texts, extra_tokens=list(task.source.entities))
    # A short prompt template and top-1 search keep sequences ~120-210 tokens so the test stays fast.
    env = SearchR1Env(
        BM25Retriever(docs=task.corpus), topk=1, max_obs_tokens=48, tokenizer=tok, template=TEMPLATE
    )
    yield task, demos, tok, env
    torch.set_num_threads(threads)


def test_examples_are_the_rl_time_sequences(setup) -> None:
    task, demos, tok, env = setup
    examples = build_sft_examples(tok, env, demos)
    encode_prompt, encode = default_encoders(tok)
    assert len(examples) == len(demos)
    for ex, demo in zip(examples, demos, strict=True):
        state, prompt = env.start(demo.row)
        prompt_ids = encode_prompt(prompt)
        assert ex.input_ids[: ex.prompt_len] == prompt_ids and ex.prompt_len == len(prompt_ids)
        assert ex.loss_mask[: ex.prompt_len] == [0] * ex.prompt_len
        assert len(ex.input_ids) == len(ex.loss_mask) and ex.n_steps == len(demo.steps)
        # Rebuild the layout by hand: step ids (trained) then observation ids tokenized on their own (masked).
        ids, mask = list(prompt_ids), [0] * len(prompt_ids)
        for step in demo.steps:
            res = env.step([state], [step])[0]
            ids += encode(step)
            mask += [1] * len(encode(step))
            if res.observation:
                ids += encode(res.observation)
                mask += [0] * len(encode(res.observation))
            state = res.state
        assert ex.input_ids == ids and ex.loss_mask == mask
        # Trained tokens decode to exactly the demonstration's steps.
        trained = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m])
        assert trained == "".join(demo.steps)
        assert ex.reward == (1.0 if demo.correct else 0.2)


def test_sft_lowers_loss_and_greedy_output_follows_the_protocol(setup) -> None:
    task, demos, tok, env = setup
    model = tiny_causal_lm(tok, hidden=64, layers=2, heads=4, seed=0)
    seen = []
    stats = warm_start(
        model,
        tok,
        env,
        demos,
        epochs=30,
        lr=5e-3,
        batch_size=16,
        seed=0,
        on_step=lambda s, t, loss: seen.append(s),
    )
    assert stats.examples == 32 and stats.steps == 60 and seen == list(range(1, 61))
    assert stats.loss_after < 0.25 * stats.loss_before
    assert stats.epoch_losses[-1] < stats.epoch_losses[0]
    assert 0.2 < stats.demo_reward_mean < 1.0  # imperfect demos: some stop one hop early
    # Greedy first step on training questions: "<think> … </think>\n<search> … </search>".
    encode_prompt, _ = default_encoders(tok)
    rows = task.train_rows[:16]
    contexts = [encode_prompt(env.start(r)[1]) for r in rows]
    width = max(len(c) for c in contexts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(c)) + c for c in contexts])
    attention = (ids != tok.pad_token_id).long()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=attention,
            max_new_tokens=40,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    texts = [tok.decode(o[width:].tolist(), skip_special_tokens=True) for o in out]
    follows = [bool(STEP_RE.match(t)) for t in texts]
    assert sum(follows) >= 8, texts
    # The protocol-following steps drive the real environment to a search.
    results = env.step([env.start(r)[0] for r in rows], [t[: t.find("</search>") + 9] for t in texts])
    assert sum(r.action == "search" for r in results) >= 8


def test_training_is_seeded(setup) -> None:
    _, demos, tok, env = setup
    examples = build_sft_examples(tok, env, demos[:16])
    runs = []
    for _ in range(2):
        model = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=3)
        runs.append(
            sft_train(model, examples, epochs=2, lr=1e-3, batch_size=8, seed=1, pad_id=tok.pad_token_id)
        )
    assert runs[0].epoch_losses == runs[1].epoch_losses and runs[0].loss_after == runs[1].loss_after


def test_loss_ignores_masked_tokens(setup) -> None:
    _, _, tok, _ = setup
    model = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=0)
    a = SFTExample([5, 6, 7, 8, 9], [0, 0, 1, 1, 0], 2)
    b = SFTExample([5, 6, 7, 8, 10], [0, 0, 1, 1, 0], 2)  # differs only in a masked token
    c = SFTExample([5, 6, 7, 9, 9], [0, 0, 1, 1, 0], 2)  # differs in a trained token
    assert sft_loss(model, [a]) == pytest.approx(sft_loss(model, [b]), abs=1e-6)
    assert sft_loss(model, [a]) != pytest.approx(sft_loss(model, [c]), abs=1e-6)


def test_bad_input_is_a_clear_error(setup) -> None:
    task, demos, tok, env = setup
    with pytest.raises(ValueError, match="no demonstrations"):
        build_sft_examples(tok, env, [])
    with pytest.raises(ValueError, match="non-empty list of step texts"):
        build_sft_examples(tok, env, [{"row": task.train_rows[0], "steps": []}])
    with pytest.raises(ValueError, match="question"):
        build_sft_examples(
            tok, env, [({"group_id": "g1", "golden_answers": ["x"]}, ["<answer> x </answer>"])]
        )
    model = tiny_causal_lm(tok, hidden=32, layers=1, heads=2, seed=0)
    examples = build_sft_examples(tok, env, demos[:2])
    with pytest.raises(ValueError, match="max_length"):
        sft_train(model, examples, max_length=10)
    with pytest.raises(ValueError, match="epochs"):
        sft_train(model, examples, epochs=0)
    assert isinstance(Task, type)
