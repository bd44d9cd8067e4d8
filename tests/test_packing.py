"""Prefix-shared `tree` packing gives the loss and gradients of per-leaf `leaf` packing."""

import random

import pytest
import torch

from treegrpo.loss import LossConfig
from treegrpo.models import tiny_causal_lm
from treegrpo.packing import forward_logprobs, loss_token_totals, pack, packed_loss
from treegrpo.tokenizer import train_tokenizer
from treegrpo.tree import Tree

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi"])


def random_tree(rng: random.Random, vocab: int, index: int, n_steps: int = 6) -> Tree:
    """Random ids, random step / observation lengths, random branch shape (some empty observations)."""
    t = Tree.new("g", index, [rng.randrange(vocab) for _ in range(rng.randint(2, 7))])
    for _ in range(n_steps):
        parent = rng.choice([n.id for n in t.internal_nodes()])
        gen = rng.randint(1, 6)
        leaf = rng.random() < 0.35
        obs = [] if leaf else [rng.randrange(vocab) for _ in range(rng.randint(0, 4))]
        t.add_child(
            parent,
            token_ids=[rng.randrange(vocab) for _ in range(gen)],
            logprobs=[-3 * rng.random() for _ in range(gen)],
            obs_ids=obs,
            is_leaf=leaf,
        )
    for n in t.nodes[1:]:
        n.is_leaf = n.is_leaf or not n.children
    return t


def trees_and_adv(vocab: int, seed: int = 0, n_trees: int = 3):
    rng = random.Random(seed)
    trees = [random_tree(rng, vocab, i) for i in range(n_trees)]
    adv = [rng.gauss(0.0, 1.0) for _ in range(sum(len(t.leaves()) for t in trees))]
    return trees, adv


def loss_and_grads(model, ref, trees, adv, packing, cfg):
    batch = pack(trees, adv, packing, cfg.loss_agg_mode, cfg.norm_length)
    with torch.no_grad():
        ref_lp = forward_logprobs(ref, batch)[0]
    model.zero_grad()
    loss, metrics = packed_loss(model, batch, cfg, ref_lp)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()], metrics, batch


@pytest.mark.parametrize(
    ("arch", "impl"), [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "eager"), ("qwen2", "sdpa")]
)
@pytest.mark.parametrize("mode", MODES)
def test_tree_and_leaf_packing_give_equal_loss_and_gradients(tok, arch, impl, mode):
    model = tiny_causal_lm(tok, arch=arch, hidden=32, layers=2, heads=4, attn_implementation=impl)
    ref = tiny_causal_lm(tok, arch=arch, hidden=32, layers=2, heads=4, seed=1, attn_implementation=impl)
    trees, adv = trees_and_adv(len(tok), seed=MODES.index(mode) * 7 + len(arch + impl))
    # A small ε so that some tokens clip: the clip branches must agree too.
    cfg = LossConfig(loss_agg_mode=mode, epsilon=0.05, beta=0.1, kl_estimator="k3", entropy_coeff=0.01)
    lt, gt, mt, bt = loss_and_grads(model, ref, trees, adv, "tree", cfg)
    ll, gl, ml, bl = loss_and_grads(model, ref, trees, adv, "leaf", cfg)
    assert bt.num_forward_tokens < bl.num_forward_tokens
    assert lt == pytest.approx(ll, rel=1e-5, abs=1e-7)
    scale = max(g.abs().max().item() for g in gl)
    assert scale > 0
    for a, b in zip(gt, gl, strict=True):
        assert (a - b).abs().max().item() <= 1e-5 * scale
    for k in ("pg_loss", "kl", "entropy", "clipfrac"):
        assert mt[k] == pytest.approx(ml[k], rel=1e-4, abs=1e-6), k
    assert mt["clipfrac"] > 0


def token_table(batch, lp):
    """(node id, offset in node) → log-prob of every scored token."""
    out = {}
    for r in range(batch.input_ids.shape[0]):
        seen: dict[tuple[int, int], int] = {}
        for t in range(batch.input_ids.shape[1]):
            nid = int(batch.node_ids[r, t])
            if nid < 0:
                continue
            key = (int(batch.tree_index[r, t]), nid)
            off = seen.get(key, 0)
            seen[key] = off + 1
            if batch.loss_mask[r, t]:
                out.setdefault((int(batch.tree_index[r, t]), nid, off), []).append(float(lp[r, t]))
    return out


def test_per_token_logprobs_match_between_packings(tok):
    model = tiny_causal_lm(tok, arch="qwen2", hidden=32, attn_implementation="sdpa")
    trees, adv = trees_and_adv(len(tok), seed=5)
    bt, bl = pack(trees, adv, "tree"), pack(trees, adv, "leaf")
    with torch.no_grad():
        tt = token_table(bt, forward_logprobs(model, bt)[0])
        tl = token_table(bl, forward_logprobs(model, bl)[0])
    assert tt.keys() == tl.keys()
    for key, vals in tl.items():
        assert len(tt[key]) == 1  # each unique token forwarded once in tree packing
        assert all(abs(v - tt[key][0]) < 1e-5 for v in vals)


def test_tree_layout_positions_targets_and_mask():
    t = Tree.new("g", 0, [1, 2, 3])
    a = t.add_child(0, token_ids=[4, 5], logprobs=[-0.1, -0.2], obs_ids=[6])
    t.add_child(a.id, token_ids=[7], logprobs=[-0.3], is_leaf=True)
    t.add_child(a.id, token_ids=[8, 9], logprobs=[-0.4, -0.5], is_leaf=True)
    t.add_child(0, token_ids=[10], logprobs=[-0.6], is_leaf=True)
    t.add_child(0, token_ids=[11], logprobs=[-0.6], obs_ids=[12])  # unfinished branch: no leaf below
    b = pack([t], [1.0, -1.0, 0.5], "tree")
    assert b.input_ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 6, 7, 3]
    assert b.target_index[0].tolist() == [-1, 0, 1, 2, 3, 4, 5, 5, 7, 2]
    assert b.loss_mask[0].tolist() == [False] * 3 + [True, True, False, True, True, True, True]
    allowed = b.visibility()[0, 0]
    assert allowed[7].tolist() == [True] * 6 + [
        False,
        True,
        False,
        False,
    ]  # token 8 sees prompt, node a, itself
    assert allowed[9].tolist() == [True] * 3 + [False] * 6 + [True]
    assert b.old_logprobs[0, 3:5].tolist() == pytest.approx([-0.1, -0.2])
    w = 1 / 8  # token-mean: 8 loss tokens counted per leaf (2+1, 2+2, 1)
    assert b.weights.adv_pos[0, 3].item() == pytest.approx(w * 1.0)  # node a: leaves with A = 1, −1
    assert b.weights.adv_neg[0, 3].item() == pytest.approx(-w * 1.0)
    assert b.weights.weight[0, 3].item() == pytest.approx(2 * w)
    assert b.num_forward_tokens == 10
    assert pack([t], [1.0, -1.0, 0.5], "leaf").num_forward_tokens == 7 + 8 + 4


def test_micro_batches_with_totals_sum_to_the_full_batch(tok):
    model = tiny_causal_lm(tok, hidden=32)
    trees, adv = trees_and_adv(len(tok), seed=2, n_trees=4)
    cfg = LossConfig(beta=0.0)
    full, _ = packed_loss(model, pack(trees, adv, "tree"), cfg)
    n, s = loss_token_totals(trees)
    k = sum(len(t.leaves()) for t in trees[:2])
    parts = [
        packed_loss(model, pack(trees[:2], adv[:k], "tree", total_tokens=n, total_sequences=s), cfg)[0],
        packed_loss(model, pack(trees[2:], adv[k:], "tree", total_tokens=n, total_sequences=s), cfg)[0],
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), rel=1e-5)


def test_bad_input_is_a_clear_error(tok):
    trees, adv = trees_and_adv(len(tok), seed=3)
    with pytest.raises(ValueError, match="leaves"):
        pack(trees, adv[:-1])
    with pytest.raises(ValueError, match="packing"):
        pack(trees, adv, "chain")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not finite"):
        pack(trees, [float("nan")] + adv[1:])
    trees[0].nodes[1].logprobs = trees[0].nodes[1].logprobs[:-1]
    with pytest.raises(ValueError, match="node 1"):
        pack(trees, adv)
    with pytest.raises(ValueError, match="at least one tree"):
        pack([], [])
