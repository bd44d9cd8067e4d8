"""Locally trained tokenizers: protocol tags as single tokens, exact round trips, chat template."""

import pytest

from treegrpo.models import tiny_causal_lm
from treegrpo.tokenizer import PROTOCOL_TAGS, train_tokenizer

CORPUS = [
    "The capital of France is Paris.",
    "Who wrote Hamlet? William Shakespeare wrote it in 1600.",
    "search the web, then answer:  twice\nnew line\there",
]


@pytest.fixture(scope="module", params=["wordlevel", "bpe"])
def tok(request):
    return train_tokenizer(CORPUS, kind=request.param, vocab_size=400)


def test_protocol_tags_are_single_non_special_tokens(tok):
    for tag in PROTOCOL_TAGS:
        ids = tok.encode(tag, add_special_tokens=False)
        assert len(ids) == 1, tag
        # Non-special: they survive skip_special_tokens (the environment parses them from text).
        assert tok.decode(ids, skip_special_tokens=True) == tag


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        "<think> Who wrote Hamlet? </think><search> William Shakespeare </search>",
        "<answer> Paris </answer>",
        "search  twice\nnew line\there",
    ],
)
def test_round_trip_of_seen_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids


def test_bpe_round_trips_unseen_text():
    tok = train_tokenizer(CORPUS, kind="bpe", vocab_size=400)
    text = "Zebras über 9000 ünïcödé — yes"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_wordlevel_words_are_single_tokens():
    tok = train_tokenizer(CORPUS, kind="wordlevel")
    assert len(tok.encode(" Shakespeare", add_special_tokens=False)) == 1
    assert len(tok.encode("Shakespeare", add_special_tokens=False)) == 1  # line-start variant learned too
    ids = tok.encode("Paris unseenword", add_special_tokens=False)
    assert tok.unk_token_id in ids  # unseen words map to <unk>, not a crash


def test_special_tokens_and_chat_template(tok):
    specials = {tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}
    assert None not in specials and len(specials) == 4
    msgs = [{"role": "system", "content": "answer."}, {"role": "user", "content": "The capital of France"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nThe capital of France<|im_end|>" in text
    assert tok.unk_token_id not in ids


def test_extra_tokens_and_bad_kind():
    tok = train_tokenizer(CORPUS, extra_tokens=["New York City"])
    assert len(tok.encode("New York City", add_special_tokens=False)) == 1
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(CORPUS, kind="sentencepiece")  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_causal_lm_is_seeded_and_sized(tok, arch):
    import torch

    a = tiny_causal_lm(tok, arch=arch, hidden=32, layers=1, heads=2, seed=3)
    b = tiny_causal_lm(tok, arch=arch, hidden=32, layers=1, heads=2, seed=3)
    c = tiny_causal_lm(tok, arch=arch, hidden=32, layers=1, heads=2, seed=4)
    assert a.config.vocab_size == len(tok)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
    out = a(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, len(tok))
    with pytest.raises(ValueError, match="arch"):
        tiny_causal_lm(tok, arch="gpt2")  # type: ignore[arg-type]
