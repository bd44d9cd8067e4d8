"""HFPolicy: token ids in/out, stop tags, greedy determinism, prefix-cache reuse, live weights."""

import numpy as np
import pytest
import torch

from treegrpo.models import tiny_causal_lm
from treegrpo.packing import forward_logprobs, pack
from treegrpo.policies import HFPolicy
from treegrpo.policies.hf import KVBlock, PrefixCache
from treegrpo.protocols import Policy
from treegrpo.tokenizer import train_tokenizer
from treegrpo.tree import Tree

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(
        ["the quick brown fox jumps over the lazy dog . who where when what"], extra_tokens=["</search>!!"]
    )


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tok):
    return tiny_causal_lm(tok, arch=request.param, hidden=32, layers=2, heads=4, seed=7)


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def memorize(tok, pairs, steps=80):
    """A tiny model that greedily continues each prompt with its scripted continuation."""
    m = tiny_causal_lm(tok, hidden=32, layers=1, heads=4, seed=3)
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    seqs = [p + c for p, c in pairs]
    width = max(map(len, seqs))
    x = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    weight = torch.zeros(len(seqs), width - 1)  # train only the continuations (right padding is causal-safe)
    for i, (p, c) in enumerate(pairs):
        weight[i, len(p) - 1 : len(p) - 1 + len(c)] = 1.0
    for _ in range(steps):
        logp = torch.log_softmax(m(input_ids=x).logits[:, :-1], -1)
        nll = -logp.gather(-1, x[:, 1:, None])[..., 0]
        loss = (nll * weight).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


def test_implements_policy_protocol(model, tok):
    assert isinstance(HFPolicy(model, tok), Policy)


def test_round_trip_sampled_ids_are_trained_ids(model, tok):
    """Sample a small tree, pack it: target ids == sampled ids, recomputed log-probs ≈ sampling log-probs."""
    pol = HFPolicy(model, tok, max_new_tokens=8, stop_strings=(), temperature=1.0, seed=1)
    prompt = pol.encode_prompt([{"role": "user", "content": "who jumps over the dog"}])
    t = Tree.new("g", 0, prompt)
    s1 = pol.generate([prompt])[0]
    a = t.add_child(
        0, token_ids=s1.token_ids, logprobs=s1.logprobs, obs_ids=pol.encode_observation(" the fox .")
    )
    kids = pol.generate([t.context_ids(a.id), t.context_ids(a.id), prompt])
    t.add_child(a.id, token_ids=kids[0].token_ids, logprobs=kids[0].logprobs, is_leaf=True)
    t.add_child(a.id, token_ids=kids[1].token_ids, logprobs=kids[1].logprobs, is_leaf=True)
    t.add_child(0, token_ids=kids[2].token_ids, logprobs=kids[2].logprobs, is_leaf=True)
    batch = pack([t], [1.0, -0.5, 0.2], "tree")
    with torch.no_grad():
        lp, ent = forward_logprobs(model, batch)
    sampled_ids = [tid for n in t.nodes[1:] for tid in n.token_ids]
    sampled_lp = [x for n in t.nodes[1:] for x in n.logprobs]
    sampled_ent = [x for s in [s1, *kids] for x in s.entropies]
    m = batch.loss_mask[0]
    assert batch.input_ids[0][m].tolist() == sampled_ids  # DFS order == node order here
    assert lp[0][m].tolist() == pytest.approx(sampled_lp, abs=1e-4)
    assert ent[0][m].tolist() == pytest.approx(sampled_ent, abs=1e-4)
    assert all(1 <= len(n.token_ids) <= 8 for n in t.nodes[1:])


def test_stop_tag_cuts_the_step_and_keeps_the_whole_token(tok):
    p1, p2, p3 = ids(tok, "who fox"), ids(tok, "where dog"), ids(tok, "when lazy")
    c1 = ids(tok, " the fox</search>") + ids(tok, " jumps over")
    c2 = ids(tok, " lazy") + [tok.convert_tokens_to_ids("</search>!!")] + ids(tok, " brown dog")
    c3 = ids(tok, " quick brown") + [tok.eos_token_id] + ids(tok, " fox")
    m = memorize(tok, [(p1, c1), (p2, c2), (p3, c3)])
    pol = HFPolicy(m, tok, greedy=True, max_new_tokens=12)
    out = pol.generate([p1, p2, p3])
    assert out[0].token_ids == ids(tok, " the fox</search>")
    assert out[0].text == " the fox</search>"
    # the stop tag ends inside a token: the whole token is kept, text parsed from the sampled ids
    assert out[1].token_ids == c2[:2] and out[1].text == " lazy</search>!!"
    # EOS ends the step and is kept (the sampled ids are the truth)
    assert out[2].token_ids == c3[:3] and out[2].text == " quick brown"
    assert [len(s.logprobs) for s in out] == [len(s.token_ids) for s in out]
    # without stop strings the step runs on
    free = HFPolicy(m, tok, greedy=True, max_new_tokens=4, stop_strings=()).generate([p1])[0]
    assert free.token_ids == c1[:4]


def test_greedy_is_deterministic_and_batch_independent(model, tok):
    ctxs = [ids(tok, "the quick brown"), ids(tok, "who"), ids(tok, "over the lazy dog . who")]
    a = HFPolicy(model, tok, greedy=True, max_new_tokens=10, stop_strings=()).generate(ctxs)
    b = HFPolicy(model, tok, greedy=True, max_new_tokens=10, stop_strings=(), batch_size=1).generate(ctxs)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    for s, u in zip(a, b, strict=True):
        assert s.logprobs == pytest.approx(u.logprobs, abs=1e-5)
    # a tiny nucleus is greedy as well
    c = HFPolicy(model, tok, top_p=1e-6, max_new_tokens=10, stop_strings=(), seed=9).generate(ctxs)
    assert [s.token_ids for s in c] == [s.token_ids for s in a]


def test_seeded_sampling_is_reproducible(model, tok):
    ctx = [ids(tok, "the quick brown")] * 3
    a = HFPolicy(model, tok, max_new_tokens=6, stop_strings=(), seed=4).generate(ctx)
    b = HFPolicy(model, tok, max_new_tokens=6, stop_strings=(), seed=4).generate(ctx)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert len({tuple(s.token_ids) for s in a}) > 1  # temperature 1 on a random model: rows differ


def test_prefix_cache_reuse_saves_prefill_and_keeps_outputs(model, tok):
    kw = dict(greedy=True, max_new_tokens=6, stop_strings=())
    cached = HFPolicy(model, tok, **kw)
    plain = HFPolicy(model, tok, prefix_cache_tokens=0, **kw)
    prompt = ids(tok, "who jumps over the lazy dog . the quick brown fox")
    first_c = cached.generate([prompt, prompt[:4]])
    assert [s.prefill_tokens for s in first_c] == [len(prompt), 4]
    obs = ids(tok, " where when")
    nxt = [
        prompt + first_c[0].token_ids + obs,  # next step of a branch
        prompt,  # a new expansion from the root
        prompt[:4] + first_c[1].token_ids,
        ids(tok, "what"),  # nothing shared
    ]
    out_c, out_p = cached.generate(nxt), plain.generate(nxt)
    assert [s.token_ids for s in out_c] == [s.token_ids for s in out_p]
    for s, u in zip(out_c, out_p, strict=True):
        assert s.logprobs == pytest.approx(u.logprobs, abs=1e-4)
    assert [s.prefill_tokens for s in out_p] == [len(c) for c in nxt]
    # only the last sampled token + observation, one token of the root, one token of the other branch
    assert [s.prefill_tokens for s in out_c] == [1 + len(obs), 1, 1, 1]
    assert cached.stats["cached_tokens"] > 0
    assert cached.stats["prefill_tokens"] < plain.stats["prefill_tokens"]


def test_generation_uses_live_weights_and_restores_train_mode(tok):
    m = tiny_causal_lm(tok, hidden=32, seed=11)
    m.train()
    pol = HFPolicy(m, tok, greedy=True, max_new_tokens=5, stop_strings=())
    ctx = [ids(tok, "the quick brown fox")]
    before = pol.generate(ctx)[0]
    assert m.training and len(pol.cache) > 0
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    out = m(input_ids=torch.tensor(ctx)).logits
    (-out[0, -1, before.token_ids[0]]).backward()
    opt.step()  # in-place update: the cached KV is stale now
    after = pol.generate(ctx)[0]
    fresh = HFPolicy(m, tok, greedy=True, max_new_tokens=5, stop_strings=(), prefix_cache_tokens=0)
    assert after.token_ids == fresh.generate(ctx)[0].token_ids
    assert after.prefill_tokens == len(ctx[0])  # cache was invalidated by the weight change
    assert after.logprobs[0] > before.logprobs[0]  # the step raised that token's probability


def test_encoding_and_limits(model, tok):
    pol = HFPolicy(model, tok, max_new_tokens=50, stop_strings=(), max_context=12)
    assert pol.encode_prompt([5, 6, 7]) == [5, 6, 7]
    msgs = [{"role": "user", "content": "who"}]
    assert pol.encode_prompt(msgs) == tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
    assert pol.encode_observation(" the fox") == ids(tok, " the fox")
    assert pol.encode_observation("") == []
    out = pol.generate([list(range(8, 18)), list(range(8, 20)), [9]])
    assert len(out[0].token_ids) <= 2 and out[1].token_ids == [] and len(out[2].token_ids) <= 11
    with pytest.raises(ValueError, match="empty"):
        pol.encode_prompt([])
    with pytest.raises(ValueError, match="context 1"):
        pol.generate([[5], [len(tok) + 100]])
    with pytest.raises(ValueError, match="temperature"):
        HFPolicy(model, tok, temperature=0.0)


def test_rows_finishing_early_are_compacted_and_their_kv_reused(tok):
    """Rows stop at different steps (the batch shrinks); the next step re-uses every row's KV exactly."""
    prompts = [
        ids(tok, w) for w in ("who fox", "where dog", "when lazy", "what brown", "who dog", "the lazy")
    ]
    conts = [ids(tok, " the" * k + " fox</search>") for k in range(len(prompts))]
    m = memorize(tok, list(zip(prompts, conts, strict=True)), steps=120)
    kw = dict(greedy=True, max_new_tokens=10)
    cached, plain = HFPolicy(m, tok, **kw), HFPolicy(m, tok, prefix_cache_tokens=0, **kw)
    small = HFPolicy(m, tok, prefix_cache_tokens=30, **kw)  # several blocks, evictions
    first = [pol.generate(prompts) for pol in (cached, plain, small)]
    assert (
        [s.token_ids for s in first[0]] == [s.token_ids for s in first[1]] == [s.token_ids for s in first[2]]
    )
    assert [len(s.token_ids) for s in first[0]] == [len(c) for c in conts]  # really different lengths
    solo = [HFPolicy(m, tok, **kw).generate([p])[0] for p in prompts]
    for s, u in zip(first[0], solo, strict=True):
        assert s.token_ids == u.token_ids and s.logprobs == pytest.approx(u.logprobs, abs=1e-5)
    obs = ids(tok, " the quick dog .")
    nxt = [p + s.token_ids + obs for p, s in zip(prompts, first[0], strict=True)]
    out_c, out_p, out_s = (pol.generate(nxt) for pol in (cached, plain, small))
    assert [s.token_ids for s in out_c] == [s.token_ids for s in out_p] == [s.token_ids for s in out_s]
    for s, u, w in zip(out_c, out_p, out_s, strict=True):
        assert s.logprobs == pytest.approx(u.logprobs, abs=1e-4)
        assert s.entropies == pytest.approx(u.entropies, abs=1e-4)
        assert w.logprobs == pytest.approx(u.logprobs, abs=1e-4)
    assert [s.prefill_tokens for s in out_c] == [1 + len(obs)] * len(nxt)
    assert small.cache.tokens <= 30
    assert sum(s.prefill_tokens for s in out_s) < sum(len(c) for c in nxt)  # the small cache still helps


def test_prefix_cache_counts_live_blocks_and_evicts_lru():
    def block(n):
        return KVBlock(kv=[(torch.zeros(n, 1, 2), torch.zeros(n, 1, 2))], size=n)

    cache = PrefixCache(max_tokens=10)
    b1 = block(6)
    cache.store(np.array([1, 2, 3]), b1, 0)
    cache.store(np.array([4, 5, 6]), b1, 3)
    assert cache.tokens == 6 and len(cache) == 2  # one block, counted once
    assert cache.lookup(np.array([1, 2, 9, 9])) == (2, (b1, 0))
    assert cache.lookup(np.array([7])) == (0, None)
    cache.store(np.array([1, 2]), block(2), 0)  # covered by [1, 2, 3]: not kept
    assert cache.tokens == 6 and len(cache) == 2
    b2 = block(3)
    cache.store(np.array([1, 2, 3, 4]), b2, 0)  # replaces its prefix [1, 2, 3]; b1 lives on via [4, 5, 6]
    assert cache.tokens == 9 and b1.refs == 1
    cache.store(np.array([8, 8]), block(2), 0)  # over budget: the LRU entry ([4, 5, 6], last of b1) goes
    assert cache.tokens == 5 and b1.refs == 0 and cache.lookup(np.array([4, 5])) == (0, None)
    assert cache.lookup(np.array([1, 2, 3, 4, 5]))[0] == 4


def test_small_models_generate_single_threaded_and_restore_threads(model, tok):
    before = torch.get_num_threads()
    pol = HFPolicy(model, tok, greedy=True, max_new_tokens=3, stop_strings=())
    assert pol.cpu_threads == 1
    pol.generate([ids(tok, "who")])
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="cpu_threads"):
        HFPolicy(model, tok, cpu_threads=0)
