"""`arith-tools` + the `calculator` preset: the second built-in task, on the tool-calling protocol."""

from __future__ import annotations

import pytest

from treegrpo.build import build_env, build_retriever, demonstrations_for, load_data
from treegrpo.config import load_config
from treegrpo.sft import build_sft_examples
from treegrpo.tokenizer import train_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_rows_are_disjoint_and_demos_replay_to_their_rewards():
    cfg = load_config(
        None,
        ["data.task_kwargs={seed: 1, n_train: 300, n_eval: 50}", "warmstart.num_demos=40"],
        preset="calculator",
    )
    task, train, evals = load_data(cfg)
    assert len(train) == 300 and len(evals) == 50
    assert not {r["question"] for r in train} & {r["question"] for r in evals}
    assert all(
        r["golden_answers"] == [str(r["operands"][0] * r["operands"][1] + r["operands"][2])] for r in train
    )
    assert build_retriever(cfg, task) is None  # the calculator needs no corpus
    text_env = build_env(cfg, None, None)
    tok = train_tokenizer(
        [d["text"] for d in task.corpus] + text_env.tokenizer_texts() + [r["question"] for r in train]
    )
    env = build_env(cfg, None, tok)
    assert env.format.source == "model's"  # the tiny tokenizer's own template is tool-aware
    demos = demonstrations_for(cfg, task, env, log=print)
    assert len(demos) == 40 and all(d["steps"][-1].endswith("</answer><|im_end|>") for d in demos)
    examples = build_sft_examples(tok, env, demos)
    early = [len(d["steps"]) == 2 for d in demos]
    assert 0 < sum(early) < 40  # early_stop_prob 0.5: some stop one call early
    for ex, is_early in zip(examples, early, strict=True):
        assert ex.reward == (0.0 if is_early else 1.0)  # replayed: the calculator's real results
        assert tok.unk_token_id not in ex.input_ids  # every number and template piece is in the vocabulary
