"""PPO / GRPO loss: hand-computed values, gradients, aggregation modes, the split (tree) form."""

import math

import pytest
import torch

from treegrpo.loss import (
    LossConfig,
    TokenWeights,
    compute_policy_loss,
    kl_penalty,
    leaf_weights,
    weighted_policy_loss,
)

PG_ONLY = {"beta": 0.0, "entropy_coeff": 0.0}


def one_token(ratio: float, adv: float, **cfg):
    """Loss and d loss / d logprob for one token with the given ratio and advantage."""
    lp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, m = compute_policy_loss(
        lp, old, torch.tensor([adv], dtype=torch.float64), torch.ones(1, 1), LossConfig(**{**PG_ONLY, **cfg})
    )
    loss.backward()
    return loss.item(), lp.grad.item(), m


@pytest.mark.parametrize(
    ("ratio", "adv", "loss", "grad", "clipped"),
    [
        (1.1, 1.0, -1.1, -1.1, 0.0),  # inside the trust region: −A·r, d/dlogp = −A·r
        (1.5, 1.0, -1.2, 0.0, 1.0),  # A > 0, r above 1 + ε: clipped, no gradient
        (0.5, 1.0, -0.5, -0.5, 0.0),  # A > 0, r below 1 − ε: min keeps r (pessimistic), gradient flows
        (0.5, -1.0, 0.8, 0.0, 1.0),  # A < 0, r below 1 − ε: clipped at 0.8
        (1.5, -2.0, 3.0, 3.0, 0.0),  # A < 0, r above 1 + ε: max keeps r, 2·1.5
    ],
)
def test_clipped_surrogate(ratio, adv, loss, grad, clipped):
    got_loss, got_grad, m = one_token(ratio, adv)
    assert got_loss == pytest.approx(loss, abs=1e-9)
    assert got_grad == pytest.approx(grad, abs=1e-9)
    assert m["clipfrac"] == pytest.approx(clipped)


def test_dual_clip_caps_negative_advantage_loss():
    loss, grad, m = one_token(5.0, -1.0)  # max(5, 1.2) = 5 > c = 3 → −A·c
    assert loss == pytest.approx(3.0) and grad == pytest.approx(0.0)
    assert m["clipfrac_lower"] == pytest.approx(1.0)
    loss, grad, _ = one_token(5.0, -1.0, clip_ratio_c=None)
    assert loss == pytest.approx(5.0) and grad == pytest.approx(5.0)
    loss, _, m = one_token(5.0, 1.0)  # dual clip never applies to positive advantages
    assert loss == pytest.approx(-1.2) and m["clipfrac_lower"] == 0.0


def test_epsilon_high_and_log_ratio_clamp():
    assert one_token(1.25, 1.0)[0] == pytest.approx(-1.2)
    assert one_token(1.25, 1.0, epsilon_high=0.28)[0] == pytest.approx(-1.25)
    assert one_token(0.75, -1.0, epsilon=0.1, epsilon_high=0.28)[0] == pytest.approx(0.9)
    # log-ratio 50 is clamped to 20: the ratio stays finite, the gradient is zero
    lp = torch.tensor([[50.0]], dtype=torch.float64, requires_grad=True)
    loss, m = compute_policy_loss(
        lp,
        torch.zeros(1, 1, dtype=torch.float64),
        torch.tensor([-1.0]),
        torch.ones(1, 1),
        LossConfig(clip_ratio_c=None, **PG_ONLY),
    )
    loss.backward()
    assert loss.item() == pytest.approx(math.exp(20.0)) and lp.grad.item() == 0.0


def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([-1.0, -0.5]), torch.tensor([-2.0, -0.5])
    assert kl_penalty(lp, ref, "k1").tolist() == pytest.approx([1.0, 0.0])
    assert kl_penalty(lp, ref, "k2").tolist() == pytest.approx([0.5, 0.0])
    # k3 = exp(ref − lp) − (ref − lp) − 1 = e⁻¹ + 1 − 1
    assert kl_penalty(lp, ref, "k3").tolist() == pytest.approx([math.exp(-1.0), 0.0])
    assert kl_penalty(lp, ref, "low_var_kl").tolist() == kl_penalty(lp, ref, "k3").tolist()
    big = kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0]), "k3")
    assert big.item() == pytest.approx(10.0)  # clamped to [−10, 10]
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(lp, ref, "k4")


@pytest.mark.parametrize(("est", "per_token"), [("k1", 1.0), ("k2", 0.5), ("k3", math.exp(-1.0))])
def test_kl_term_in_loss(est, per_token):
    lp = torch.tensor([[-1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-2.0, -2.0]], dtype=torch.float64)
    cfg = LossConfig(beta=0.5, kl_estimator=est, entropy_coeff=0.0)
    loss, m = compute_policy_loss(
        lp, lp.detach(), torch.tensor([0.0]), torch.ones(1, 2), cfg, ref_logprobs=ref
    )
    assert loss.item() == pytest.approx(0.5 * per_token)  # A = 0: the pg term vanishes
    assert m["kl"] == pytest.approx(per_token)
    with pytest.raises(ValueError, match="ref_logprobs"):
        compute_policy_loss(lp, lp.detach(), torch.tensor([0.0]), torch.ones(1, 2), cfg)


def test_entropy_bonus():
    lp = torch.zeros(1, 2, dtype=torch.float64)
    ent = torch.tensor([[2.0, 4.0]], dtype=torch.float64, requires_grad=True)
    cfg = LossConfig(beta=0.0, entropy_coeff=0.1)
    loss, m = compute_policy_loss(lp, lp, torch.tensor([0.0]), torch.ones(1, 2), cfg, entropies=ent)
    assert loss.item() == pytest.approx(-0.1 * 3.0)
    assert m["entropy"] == pytest.approx(3.0)
    loss.backward()
    assert ent.grad[0].tolist() == pytest.approx([-0.05, -0.05])


def _agg_case(mode, norm_length=None):
    # ratio 1 everywhere, so the per-token pg loss is −A: row 0 has A = 1 on 3 tokens, row 1 A = −2 on 1.
    lp = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0]])
    cfg = LossConfig(loss_agg_mode=mode, norm_length=norm_length, **PG_ONLY)
    loss, _ = compute_policy_loss(lp, lp.detach(), torch.tensor([1.0, -2.0]), mask, cfg)
    loss.backward()
    return loss.item(), lp.grad


def test_aggregation_modes_by_hand():
    loss, grad = _agg_case("token-mean")
    assert loss == pytest.approx((-3 + 2) / 4)  # over the 4 loss tokens
    assert grad[0, 0].item() == pytest.approx(-1 / 4) and grad[1, 1].item() == pytest.approx(2 / 4)
    loss, grad = _agg_case("seq-mean-token-mean")
    assert loss == pytest.approx((-1 + 2) / 2)  # mean of per-sequence means
    assert grad[0, 0].item() == pytest.approx(-1 / 6) and grad[1, 1].item() == pytest.approx(1.0)
    loss, grad = _agg_case("seq-mean-token-sum-norm", norm_length=10)
    assert loss == pytest.approx((-3 / 10 + 2 / 10) / 2)  # Dr. GRPO: token sums / constant, mean
    assert grad[0, 0].item() == pytest.approx(-1 / 20)
    loss, _ = _agg_case("seq-mean-token-sum-norm")  # default constant: the longest loss-token count (3)
    assert loss == pytest.approx((-3 / 3 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        LossConfig(loss_agg_mode="sum")


def test_masked_tokens_have_zero_gradient_even_when_garbage():
    lp = torch.tensor([[-0.5, float("-inf"), float("nan")], [-1.0, -2.0, 1e9]], requires_grad=True)
    old = torch.tensor([[-0.4, 0.0, float("nan")], [-1.2, -2.1, -3.0]])
    ref = torch.tensor([[-0.6, float("nan"), 0.0], [-1.1, -1.9, float("-inf")]])
    ent = torch.tensor([[1.0, float("nan"), 2.0], [1.5, 1.0, float("inf")]], requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0]])
    loss, m = compute_policy_loss(
        lp, old, torch.tensor([0.7, -1.3]), mask, LossConfig(beta=0.1), ref_logprobs=ref, entropies=ent
    )
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in m.values())
    assert lp.grad[0, 1:].tolist() == [0.0, 0.0] and lp.grad[1, 2].item() == 0.0
    assert ent.grad[0, 1:].tolist() == [0.0, 0.0] and ent.grad[1, 2].item() == 0.0
    assert lp.grad[0, 0].item() != 0.0 and lp.grad[1, 1].item() != 0.0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_split_form_equals_per_leaf_sum(mode):
    """One shared token with several leaves' advantage sums = the same token repeated once per leaf."""
    g = torch.Generator().manual_seed(0)
    n_leaves, n_tok = 5, 6
    adv = torch.randn(n_leaves, generator=g, dtype=torch.float64) * 2
    # Every leaf shares token 0 (its first step) and has its own other tokens; lengths differ.
    lens = torch.tensor([6, 3, 4, 2, 5])
    mask = (torch.arange(n_tok)[None, :] < lens[:, None]).long()
    shared_lp = torch.randn(1, generator=g, dtype=torch.float64) * 0.5 - 1
    own_lp = torch.randn(n_leaves, n_tok, generator=g, dtype=torch.float64) * 0.5 - 1
    old = own_lp + torch.randn(n_leaves, n_tok, generator=g, dtype=torch.float64) * 0.4
    old[:, 0] = shared_lp - 0.6  # ratio e^0.6 on the shared token: clipped for some signs
    ref = old - 0.3
    ent = torch.rand(n_leaves, n_tok, generator=g, dtype=torch.float64)
    ent[:, 0] = 0.5
    cfg = LossConfig(loss_agg_mode=mode, beta=0.05, entropy_coeff=0.01, norm_length=8)

    # Per-leaf rows: the shared token repeated in every row.
    s1 = shared_lp.clone().requires_grad_(True)
    o1 = own_lp.clone().requires_grad_(True)
    lp_rows = torch.cat([s1.expand(n_leaves)[:, None], o1[:, 1:]], dim=1)
    loss_rows, m_rows = compute_policy_loss(lp_rows, old, adv, mask, cfg, ref, ent)
    loss_rows.backward()

    # Split form: the shared token once, carrying the sums over leaves.
    s2 = shared_lp.clone().requires_grad_(True)
    o2 = own_lp.clone().requires_grad_(True)
    w = leaf_weights(mask.sum(-1), mode, cfg.norm_length)
    per_row = TokenWeights.from_sequences(adv, mask.bool(), w)
    shared = TokenWeights(
        *(getattr(per_row, f)[:, :1].sum(0, keepdim=True) for f in per_row.__dataclass_fields__)
    )
    rest = TokenWeights(*(getattr(per_row, f)[:, 1:].reshape(1, -1) for f in per_row.__dataclass_fields__))
    tw = TokenWeights(
        *(torch.cat([getattr(shared, f), getattr(rest, f)], 1) for f in per_row.__dataclass_fields__)
    )
    lp_packed = torch.cat([s2[None, :], o2[:, 1:].reshape(1, -1)], dim=1)
    loss_packed, m_packed = weighted_policy_loss(
        lp_packed,
        torch.cat([old[:1, :1], old[:, 1:].reshape(1, -1)], 1),
        tw,
        cfg,
        torch.cat([ref[:1, :1], ref[:, 1:].reshape(1, -1)], 1),
        torch.cat([ent[:1, :1], ent[:, 1:].reshape(1, -1)], 1),
    )
    loss_packed.backward()
    assert loss_packed.item() == pytest.approx(loss_rows.item(), rel=1e-12)
    assert s2.grad.item() == pytest.approx(s1.grad.item(), rel=1e-12)
    assert torch.allclose(o2.grad, o1.grad, rtol=1e-12, atol=1e-15)
    for k in ("pg_loss", "kl", "entropy", "clipfrac", "clipfrac_lower"):
        assert m_packed[k] == pytest.approx(m_rows[k], rel=1e-9, abs=1e-12), k


def test_micro_batch_totals_reproduce_the_full_batch():
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(4, 5, generator=g, dtype=torch.float64)
    old = lp + 0.1 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    for mode in ("token-mean", "seq-mean-token-mean"):
        cfg = LossConfig(loss_agg_mode=mode, **PG_ONLY)
        full, _ = compute_policy_loss(lp, old, adv, mask, cfg)
        n, s = int(mask.sum()), 4
        parts = [
            compute_policy_loss(
                lp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], cfg, None, None, n, s
            )[0]
            for i in (0, 2)
        ]
        assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), rel=1e-12)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        compute_policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="clip_ratio_c"):
        LossConfig(clip_ratio_c=0.5)
