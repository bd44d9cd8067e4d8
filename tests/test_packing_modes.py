"""Logits at loss positions, row packing, FlexAttention masks and `path` mode: all exact against `leaf`."""

import random

import pytest
import torch

from test_packing import random_tree, trees_and_adv
from treegrpo.logits import split_causal_lm
from treegrpo.loss import LossConfig
from treegrpo.models import tiny_causal_lm
from treegrpo.packing import additive_mask, first_fit_decreasing, forward_logprobs, pack, packed_loss
from treegrpo.tokenizer import train_tokenizer

CFG = LossConfig(epsilon=0.05, beta=0.1, kl_estimator="k3", entropy_coeff=0.01)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi"])


def full_logits_reference(model, batch, temperature=1.0):
    """Log-probs and entropies from the model's own forward: full logits at every slot, dense mask."""
    attn = (
        batch.attention_mask if batch.packing == "leaf" else additive_mask(batch.visibility(), torch.float32)
    )
    logits = model(input_ids=batch.input_ids, attention_mask=attn, position_ids=batch.position_ids).logits
    logp = torch.log_softmax(logits.float() / temperature, -1)
    src = batch.target_index.clamp(min=0)
    rows = torch.arange(src.shape[0])[:, None].expand_as(src)
    at = logp[rows, src]  # (R, T, V): distribution predicting each slot
    lp = at.gather(-1, batch.input_ids[..., None]).squeeze(-1)
    ent = -(at.exp() * at).sum(-1)
    want = batch.loss_mask & (batch.target_index >= 0)
    return torch.where(want, lp, 0.0), torch.where(want, ent, 0.0)


def run(model, ref, trees, adv, packing, cfg=CFG, **kw):
    batch = pack(trees, adv, packing, cfg.loss_agg_mode, cfg.norm_length, **kw)
    with torch.no_grad():
        ref_lp = forward_logprobs(ref, batch, compute_entropy=False)[0]
    model.zero_grad(set_to_none=True)
    loss, metrics = packed_loss(model, batch, cfg, ref_lp)
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return loss.item(), grads, metrics, batch


def assert_same(a, b, rel=1e-5):
    (la, ga, ma, _), (lb, gb, mb, _) = a, b
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-7)
    scale = max(g.abs().max().item() for g in gb)
    assert scale > 0
    for x, y in zip(ga, gb, strict=True):
        assert (x - y).abs().max().item() <= rel * scale
    for k in ("pg_loss", "kl", "entropy", "clipfrac", "weight_sum"):
        assert ma[k] == pytest.approx(mb[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("packing", ["tree", "leaf"])
def test_chunked_logits_at_loss_positions_equal_the_full_logits(tok, arch, packing):
    model = tiny_causal_lm(tok, arch=arch, hidden=32, attn_implementation="eager")
    trees, adv = trees_and_adv(len(tok), seed=11)
    for chunk in (0, 1, 5):
        batch = pack(trees, adv, packing, logits_chunk=chunk)
        with torch.no_grad():
            lp, ent = forward_logprobs(model, batch, temperature=0.7)
            lp_ref, ent_ref = full_logits_reference(model, batch, temperature=0.7)
        assert (lp - lp_ref).abs().max().item() < 1e-5
        assert (ent - ent_ref).abs().max().item() < 1e-5
        assert bool((lp != 0).any())


def test_chunked_logits_gradients_equal_unchunked(tok):
    model = tiny_causal_lm(tok, arch="qwen2", hidden=32)
    ref = tiny_causal_lm(tok, arch="qwen2", hidden=32, seed=1)
    trees, adv = trees_and_adv(len(tok), seed=12)
    assert_same(
        run(model, ref, trees, adv, "tree", logits_chunk=3),
        run(model, ref, trees, adv, "tree", logits_chunk=0),
    )


def test_lora_wrapped_model_uses_its_adapter(tok):
    peft = pytest.importorskip("peft")
    base = tiny_causal_lm(tok, arch="llama", hidden=32)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    parts = split_causal_lm(model)
    assert parts is not None and parts.head is base.get_output_embeddings()
    trees, adv = trees_and_adv(len(tok), seed=13)
    batch = pack(trees, adv, "tree", logits_chunk=4)
    with torch.no_grad():
        lp, _ = forward_logprobs(model, batch)
        lp_ref, _ = full_logits_reference(model, batch)
        with model.disable_adapter():
            lp_base, _ = forward_logprobs(model, batch)
    assert (lp - lp_ref).abs().max().item() < 1e-5
    assert (lp - lp_base).abs().max().item() > 1e-3  # the adapter is applied


def test_first_fit_decreasing_bins_whole_items_within_budget():
    assert first_fit_decreasing([5, 3, 8, 2, 4], 10) == [[2, 3], [0, 4], [1]]
    assert first_fit_decreasing([12, 3], 10) == [[0], [1]]  # over budget: a row of its own
    assert first_fit_decreasing([4, 4], 0) == [[0], [1]]
    bins = first_fit_decreasing([random.Random(0).randint(1, 9) for _ in range(40)], 17)
    assert sorted(i for b in bins for i in b) == list(range(40))


def test_row_packing_is_block_diagonal_with_little_padding(tok):
    trees, adv = trees_and_adv(len(tok), seed=14, n_trees=6)
    one = pack(trees, adv, "tree", max_tokens_per_row=0)
    sizes = [int(one.valid[r].sum()) for r in range(one.input_ids.shape[0])]
    rowed = pack(trees, adv, "tree", max_tokens_per_row=2 * max(sizes))
    assert rowed.input_ids.shape[0] < one.input_ids.shape[0]
    assert rowed.num_forward_tokens == one.num_forward_tokens
    vis = rowed.visibility()[:, 0]
    same_tree = rowed.tree_index[:, :, None] == rowed.tree_index[:, None, :]
    pad = ~rowed.valid
    assert not bool((vis & ~same_tree & ~pad[:, :, None]).any())  # no attention across trees
    assert bool((vis & pad[:, :, None]).sum() == pad.sum())  # a pad sees only itself
    assert len(set(rowed.tree_index[rowed.valid].tolist())) == len(trees)


@pytest.mark.parametrize(("arch", "impl"), [("llama", "eager"), ("qwen2", "sdpa"), ("llama", "sdpa")])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_row_packed_tree_equals_leaf(tok, arch, impl, mode):
    model = tiny_causal_lm(tok, arch=arch, hidden=32, attn_implementation=impl)
    ref = tiny_causal_lm(tok, arch=arch, hidden=32, seed=1, attn_implementation=impl)
    trees, adv = trees_and_adv(len(tok), seed=15 + len(arch + impl), n_trees=5)
    cfg = LossConfig(loss_agg_mode=mode, epsilon=0.05, beta=0.1, entropy_coeff=0.01)
    rowed = run(model, ref, trees, adv, "tree", cfg, max_tokens_per_row=60)
    assert rowed[3].input_ids.shape[0] < len(trees)
    assert_same(rowed, run(model, ref, trees, adv, "leaf", cfg))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_path_mode_equals_leaf(tok, arch, seed):
    model = tiny_causal_lm(tok, arch=arch, hidden=32, layers=2, kv_heads=2)
    ref = tiny_causal_lm(tok, arch=arch, hidden=32, layers=2, kv_heads=2, seed=1)
    trees, adv = trees_and_adv(len(tok), seed=20 + seed, n_trees=3)
    path = run(model, ref, trees, adv, "path")
    assert len(path[3].segments) > len(trees)
    assert_same(path, run(model, ref, trees, adv, "leaf"))
    with torch.no_grad():  # forward-only log-probs agree with tree packing slot for slot
        bt, bp = pack(trees, adv, "tree", max_tokens_per_row=0), pack(trees, adv, "path")
        assert torch.equal(bt.input_ids, bp.input_ids)
        assert (forward_logprobs(model, bt)[0] - forward_logprobs(model, bp)[0]).abs().max().item() < 1e-5


def test_path_mode_surrogate_scales_and_accumulates_like_a_loss(tok):
    model = tiny_causal_lm(tok, arch="llama", hidden=32)
    trees, adv = trees_and_adv(len(tok), seed=30)
    cfg = LossConfig(beta=0.0)
    model.zero_grad(set_to_none=True)
    loss_t, _ = packed_loss(model, pack(trees, adv, "tree"), cfg)
    (3.0 * loss_t).backward()
    want = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():  # gradients already there (an earlier micro-batch) are kept
        p.grad = torch.ones_like(p)
    loss_p, m = packed_loss(model, pack(trees, adv, "path"), cfg)
    assert all(bool((p.grad == 1).all()) for p in model.parameters())  # nothing added before backward
    assert loss_p.item() == pytest.approx(loss_t.item(), rel=1e-6)
    (3.0 * loss_p).backward()
    for p, g in zip(model.parameters(), want, strict=True):
        assert (p.grad - 1 - g).abs().max().item() <= 1e-5 * max(w.abs().max().item() for w in want)
    assert m["weight_sum"] == pytest.approx(1.0)


def test_flex_block_mask_forward_equals_dense_on_cpu(tok):
    pytest.importorskip("torch.nn.attention.flex_attention")
    dense = tiny_causal_lm(tok, arch="qwen2", hidden=32, attn_implementation="sdpa")
    try:
        flex = tiny_causal_lm(tok, arch="qwen2", hidden=32, attn_implementation="flex_attention")
    except (ValueError, ImportError) as e:  # pragma: no cover - depends on the transformers build
        pytest.skip(f"flex_attention unavailable: {e}")
    trees, adv = trees_and_adv(len(tok), seed=40, n_trees=4)
    batch = pack(trees, adv, "tree", max_tokens_per_row=80)
    with torch.no_grad():
        lp_d, ent_d = forward_logprobs(dense, batch)
        lp_f, ent_f = forward_logprobs(flex, batch)
    assert bool((lp_d != 0).any())
    assert (lp_d - lp_f).abs().max().item() < 1e-4
    assert (ent_d - ent_f).abs().max().item() < 1e-4


@pytest.mark.parametrize(("temperature", "entropy"), [(1.0, True), (0.7, True), (0.7, False)])
def test_chunk_scores_gradients_equal_plain_autograd(tok, temperature, entropy):
    from treegrpo.logits import token_scores

    model = tiny_causal_lm(tok, arch="qwen2", hidden=32)
    parts = split_causal_lm(model)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(11, 32, generator=gen, requires_grad=True)
    y = torch.randint(0, len(tok), (11,), generator=gen)
    a, b = torch.randn(11, generator=gen), torch.randn(11, generator=gen)

    def grads(lp, ent):
        model.zero_grad(set_to_none=True)
        h.grad = None
        total = (a * lp).sum() + ((b * ent).sum() if ent is not None else 0.0)
        total.backward()
        return [h.grad.clone(), model.get_output_embeddings().weight.grad.clone()]

    got = grads(*token_scores(h, y, parts, temperature, chunk=4, entropy=entropy))
    logp = torch.log_softmax(parts.head(h).float() / temperature, -1)
    want = grads(logp.gather(-1, y[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1) if entropy else None)
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max().item() <= 1e-5 * w.abs().max().item()


def test_auto_row_tokens_packs_to_the_largest_tree(tok):
    rng = random.Random(50)
    trees = [random_tree(rng, len(tok), i, n_steps=k) for i, k in enumerate([1, 9, 2, 1, 8, 1, 3, 1])]
    adv = [rng.gauss(0.0, 1.0) for _ in range(sum(len(t.leaves()) for t in trees))]
    one = pack(trees, adv, "tree", max_tokens_per_row=0)
    auto = pack(trees, adv, "tree", max_tokens_per_row=-1)
    assert auto.input_ids.shape[1] == one.input_ids.shape[1]  # rows no longer than the largest tree
    assert auto.input_ids.shape[0] < one.input_ids.shape[0]
    assert auto.num_forward_tokens == one.num_forward_tokens
    with pytest.raises(ValueError, match="max_tokens_per_row"):
        pack(trees, adv, "tree", max_tokens_per_row=-2)


def test_models_without_a_known_decoder_fall_back_to_their_own_forward(tok, monkeypatch):
    import treegrpo.packing as packing_mod

    model = tiny_causal_lm(tok, arch="llama", hidden=32)
    ref = tiny_causal_lm(tok, arch="llama", hidden=32, seed=1)
    trees, adv = trees_and_adv(len(tok), seed=60)
    split = run(model, ref, trees, adv, "tree")
    monkeypatch.setattr(packing_mod, "split_causal_lm", lambda m: None)
    assert_same(run(model, ref, trees, adv, "tree"), split)
    with pytest.raises(ValueError, match="path"):
        monkeypatch.setattr("treegrpo.path_mode.split_causal_lm", lambda m: None)
        packed_loss(model, pack(trees, adv, "path"), CFG)
