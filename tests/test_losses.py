"""Loss functions checked against numbers worked out by hand with `math`."""
import math

import pytest
import torch

from tinygpt import losses as L


def nls(z: float) -> float:
    """-log sigmoid(z), by hand."""
    return math.log(1 + math.exp(-z))


def sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def t(*xs, grad=False):
    return torch.tensor(xs, dtype=torch.float32, requires_grad=grad)


def close(x, expected, tol=1e-5):
    got = torch.as_tensor(x, dtype=torch.float64).detach().flatten().tolist()
    exp = expected if isinstance(expected, (list, tuple)) else [expected]
    assert got == pytest.approx(list(exp), abs=tol, rel=tol), (got, exp)


# ----------------------------------------------------------------------- token level


def test_token_cross_entropy_hand_value_and_ignore():
    logits = torch.tensor([[0.0, math.log(3)], [math.log(2), 0.0], [5.0, -5.0]])
    targets = torch.tensor([1, 0, -100])
    # row 0: p = 3/4 -> log(4/3); row 1: p = 2/3 -> log(3/2); row 2 ignored
    close(L.token_cross_entropy(logits, targets), math.log(4 / 3) + math.log(3 / 2))
    close(L.token_cross_entropy(logits, targets, reduction="mean"),
          (math.log(4 / 3) + math.log(3 / 2)) / 2)
    per = L.token_cross_entropy(logits.view(1, 3, 2), targets.view(1, 3), reduction="none")
    assert per.shape == (1, 3)
    close(per, [math.log(4 / 3), math.log(3 / 2), 0.0])
    with pytest.raises(ValueError):
        L.token_cross_entropy(logits, targets, reduction="avg")


def test_token_logprobs_matches_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[1, 3:] = -100
    lp = L.token_logprobs(logits, targets)
    ref = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = ref.masked_fill(targets == -100, 0.0)
    assert lp.shape == targets.shape and lp.dtype == torch.float32
    assert torch.allclose(lp, ref, atol=1e-6)
    assert (lp[1, 3:] == 0).all()
    # half-precision logits come back as float32
    assert L.token_logprobs(logits.bfloat16(), targets).dtype == torch.float32


def test_entropy_uniform_is_log_v_and_banned_tokens_are_safe():
    close(L.entropy_from_logits(torch.zeros(3, 7)), [math.log(7)] * 3)
    z = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]], requires_grad=True)
    h = L.entropy_from_logits(z)
    close(h, math.log(2))
    h.sum().backward()
    assert torch.isfinite(z.grad).all()


# ------------------------------------------------------------------ preference losses


def test_bradley_terry_with_and_without_margin():
    rc, rr = t(2.0, 0.0), t(1.0, 1.0)
    close(L.bradley_terry_loss(rc, rr), [nls(1.0), nls(-1.0)])
    close(L.bradley_terry_loss(rc, rr, margin=t(0.5, 0.0)), [nls(0.5), nls(-1.0)])
    close(L.bradley_terry_loss(rc, rr, margin=1.0), [nls(0.0), nls(-2.0)])


# pi_c, pi_r, ref_c, ref_r -> log-ratios chosen [1, 0], rejected [-1, 1], h = [2, -1]
DPO_IN = dict(pi_c=t(-10.0, -5.0), pi_r=t(-12.0, -4.0), ref_c=t(-11.0, -5.0), ref_r=t(-11.0, -5.0))


def test_dpo_sigmoid_and_conservative():
    loss, rc, rr = L.dpo_loss(**DPO_IN, beta=0.1)
    close(loss, [nls(0.2), nls(-0.1)])
    close(rc, [0.1, 0.0])
    close(rr, [-0.1, 0.1])
    assert not rc.requires_grad and not rr.requires_grad
    loss, _, _ = L.dpo_loss(**DPO_IN, beta=0.1, label_smoothing=0.1)
    close(loss, [0.9 * nls(0.2) + 0.1 * nls(-0.2), 0.9 * nls(-0.1) + 0.1 * nls(0.1)])


def test_dpo_robust():
    loss, _, _ = L.dpo_loss(**DPO_IN, beta=0.1, loss_type="robust", label_smoothing=0.1)
    close(loss, [(0.9 * nls(0.2) - 0.1 * nls(-0.2)) / 0.8, (0.9 * nls(-0.1) - 0.1 * nls(0.1)) / 0.8])
    # without smoothing robust DPO is plain DPO
    loss0, _, _ = L.dpo_loss(**DPO_IN, beta=0.1, loss_type="robust")
    close(loss0, [nls(0.2), nls(-0.1)])
    with pytest.raises(ValueError):
        L.dpo_loss(**DPO_IN, loss_type="robust", label_smoothing=0.5)


def test_dpo_hinge_active_and_inactive():
    loss, _, _ = L.dpo_loss(**DPO_IN, beta=0.6, loss_type="hinge")
    close(loss, [0.0, 1.6])  # relu(1 - 1.2), relu(1 + 0.6)


def test_dpo_ipo_length_normalised():
    loss, rc, _ = L.dpo_loss(**DPO_IN, beta=0.1, loss_type="ipo", len_c=t(2.0, 4.0),
                             len_r=t(4.0, 2.0))
    # h' = 1/2 - (-1)/4 = 0.75 and 0/4 - 1/2 = -0.5; target 1/(2*0.1) = 5
    close(loss, [(0.75 - 5) ** 2, (-0.5 - 5) ** 2])
    close(rc, [0.1, 0.0])
    with pytest.raises(ValueError, match="len_c"):
        L.dpo_loss(**DPO_IN, loss_type="ipo")


def test_dpo_unknown_type_lists_choices():
    with pytest.raises(ValueError, match="sigmoid.*ipo.*hinge.*robust"):
        L.dpo_loss(**DPO_IN, loss_type="nope")


def test_dpo_is_log2_at_reference_and_gradient_signs():
    pi_c, pi_r = t(-3.0, -7.0, grad=True), t(-4.0, -2.0, grad=True)
    loss, _, _ = L.dpo_loss(pi_c, pi_r, pi_c.detach().clone(), pi_r.detach().clone(), beta=0.5)
    close(loss, [math.log(2)] * 2)
    loss.sum().backward()
    assert (pi_c.grad < 0).all()  # descending raises the chosen log-prob
    assert (pi_r.grad > 0).all()  # and lowers the rejected one
    close(pi_c.grad, [-0.25, -0.25])  # d/dh of -log s(beta h) at h=0 is -beta/2


def test_simpo_hand_values():
    pi_c, pi_r = t(-4.0, -9.0), t(-9.0, -2.0)
    len_c, len_r = t(2.0, 3.0), t(3.0, 1.0)
    # averages: chosen [-2, -3], rejected [-3, -2]; z = 2*(diff) - 0.5 = [1.5, -2.5]
    loss, rc, rr = L.simpo_loss(pi_c, pi_r, len_c, len_r, beta=2.0, gamma=0.5)
    close(loss, [nls(1.5), nls(-2.5)])
    close(rc, [-4.0, -6.0])
    close(rr, [-6.0, -4.0])
    loss, _, _ = L.simpo_loss(pi_c, pi_r, len_c, len_r, beta=2.0, gamma=0.5, label_smoothing=0.2)
    close(loss, [0.8 * nls(1.5) + 0.2 * nls(-1.5), 0.8 * nls(-2.5) + 0.2 * nls(2.5)])


def log_odds(x: float) -> float:
    return x - math.log(1 - math.exp(x))


def test_orpo_hand_values():
    pi_c, pi_r = t(-2.0, -6.0), t(-3.0, -3.0)
    len_c, len_r = t(4.0, 3.0), t(2.0, 1.0)
    # average log-probs: chosen [-0.5, -2], rejected [-1.5, -3]
    nll = t(0.5, 2.0)
    want = [0.5 + 0.1 * nls(log_odds(-0.5) - log_odds(-1.5)),
            2.0 + 0.1 * nls(log_odds(-2.0) - log_odds(-3.0))]
    loss, rc, rr = L.orpo_loss(pi_c, pi_r, len_c, len_r, nll, lam=0.1)
    close(loss, want)
    close(rc, [-0.05, -0.2])
    close(rr, [-0.15, -0.3])
    # nll_c omitted: the mean NLL of the chosen response is used, here the same numbers
    close(L.orpo_loss(pi_c, pi_r, len_c, len_r, lam=0.1)[0], want)
    # close to 0 the stable form still matches the exact odds
    loss, _, _ = L.orpo_loss(t(-1e-3), t(-2.0), 1, 1, t(0.0), lam=1.0)
    close(loss, nls(log_odds(-1e-3) - log_odds(-2.0)), tol=1e-4)


@pytest.mark.parametrize("c,r", [(-1e-8, -50.0), (-50.0, -1e-8), (-1e-8, -1e-8), (0.0, -50.0)])
def test_orpo_is_finite_at_extremes(c, r):
    pi_c, pi_r = t(c, grad=True), t(r, grad=True)
    loss, _, _ = L.orpo_loss(pi_c, pi_r, t(1.0), t(1.0), lam=0.1)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(pi_c.grad).all() and torch.isfinite(pi_r.grad).all()


def test_kto_hand_values_two_desirable_one_undesirable():
    pi, ref = t(-5.0, -6.0, -7.0, grad=True), t(-6.0, -6.0, -6.0)
    desirable = torch.tensor([True, True, False])
    kl_pi, kl_ref = t(-10.0, -11.0, grad=True), t(-10.5, -11.5)  # mean gap 0.5 -> z0 = 0.5
    loss, rewards, z0 = L.kto_loss(pi, ref, desirable, kl_pi, kl_ref, beta=0.1,
                                   desirable_weight=1.0, undesirable_weight=2.0)
    # r = pi - ref = [1, 0, -1]
    close(loss, [1 - sig(0.1 * (1 - 0.5)), 1 - sig(0.1 * (0 - 0.5)), 2 * (1 - sig(0.1 * (0.5 + 1)))])
    close(rewards, [0.1, 0.0, -0.1])
    close(z0, 0.5)
    assert z0.requires_grad is False
    loss.sum().backward()
    assert kl_pi.grad is None  # no gradient flows through the reference point


def test_kto_z0_clamped_at_zero():
    loss, _, z0 = L.kto_loss(t(-5.0), t(-6.0), torch.tensor([True]), t(-12.0, grad=True),
                             t(-10.0), beta=0.1)
    close(z0, 0.0)
    assert z0.requires_grad is False
    close(loss, 1 - sig(0.1 * 1.0))


# ------------------------------------------------------------------------- RL pieces


def test_kl_penalty_values_and_zero_at_equal():
    lp = t(-1.0, -2.5, -0.3)
    for kind in L.KL_KINDS:
        assert (L.kl_penalty(lp, lp.clone(), kind) == 0).all(), kind
    logp, ref = t(-1.0), t(-1.3)  # d = 0.3
    close(L.kl_penalty(logp, ref, "k1"), 0.3)
    close(L.kl_penalty(logp, ref, "k3"), math.exp(-0.3) - 1 + 0.3)
    close(L.kl_penalty(logp, ref, "mse"), 0.045)
    close(L.kl_penalty(ref, logp, "abs"), 0.3)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    assert (L.kl_penalty(a, b, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k3"):
        L.kl_penalty(a, b, "k9")


def test_gae_hand_three_steps_with_padding():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0], [0.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0], [7.0, 1.0, 0.5, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]])
    adv, ret = L.gae(rewards, values, mask, gamma=gamma, lam=lam)
    # row 0: episode ends after t=2; the padding reward 5 and value 9 are ignored
    a2 = 1.0 + gamma * 0.0 - 0.3
    a1 = (0.0 + gamma * 0.3 - 0.4) + gamma * lam * a2
    a0 = (0.0 + gamma * 0.4 - 0.5) + gamma * lam * a1
    close(adv[0], [a0, a1, a2, 0.0])
    close(ret[0], [a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0])
    # row 1: a masked prompt position in front, padding behind
    b2 = 2.0 - 0.5
    b1 = (gamma * 0.5 - 1.0) + gamma * lam * b2
    close(adv[1], [0.0, b1, b2, 0.0])
    close(ret[1], [0.0, b1 + 1.0, b2 + 0.5, 0.0])
    assert not adv.requires_grad


def test_masked_mean_and_var():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 1]])
    close(L.masked_mean(x, m), 3.0)
    close(L.masked_mean(x, m, dim=1), [1.5, 4.5])
    # kept values 1, 2, 3, 6: squared deviations 4, 1, 0, 9
    close(L.masked_var(x, m), 14 / 3)
    close(L.masked_var(x, m, unbiased=False), 14 / 4)


def test_masked_whiten_zero_mean_unit_var_over_mask():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, generator=g) * 4 + 7
    m = (torch.rand(3, 6, generator=g) > 0.3).long()
    w = L.masked_whiten(x, m)
    kept = w[m.bool()]
    assert abs(kept.mean().item()) < 1e-5
    assert abs(kept.var().item() - 1) < 1e-4  # unbiased variance
    assert (w[~m.bool()] == 0).all()
    ws = L.masked_whiten(x, m, shift_mean=False)
    assert abs(ws[m.bool()].mean().item() - x[m.bool()].mean().item()) < 1e-4
    assert (ws[~m.bool()] == 0).all()


def test_ppo_policy_loss_clipping_hand_values():
    old = t(0.0, 0.0, 0.0, 0.0)
    logp = t(0.5, -0.1, -0.5, 1.0, grad=True)
    adv = t(1.0, 1.0, -2.0, 5.0)
    mask = torch.tensor([1, 1, 1, 0])
    loss, clip_frac, approx_kl = L.ppo_policy_loss(logp.view(1, 4), old.view(1, 4),
                                                   adv.view(1, 4), mask.view(1, 4), clip=0.2)
    # t0: ratio e^.5 > 1.2 with A > 0 -> clipped, -1.2
    # t1: ratio e^-.1 inside the band -> -e^-.1
    # t2: ratio e^-.5 < 0.8 with A < 0 -> clipped, 2 * 0.8
    close(loss, (-1.2 - math.exp(-0.1) + 1.6) / 3)
    close(clip_frac, 2 / 3)
    close(approx_kl, sum(math.exp(d) - 1 - d for d in (0.5, -0.1, -0.5)) / 3)
    loss.backward()
    close(logp.grad, [0.0, -math.exp(-0.1) / 3, 0.0, 0.0])  # clipped and masked tokens: no grad
    assert not clip_frac.requires_grad and not approx_kl.requires_grad


def test_ppo_value_loss_clipping_hand_values():
    values = t(0.5, 0.1, 0.5, 9.0, grad=True).view(1, 4)
    old = torch.zeros(1, 4)
    returns = t(1.0, 1.0, 0.0, 0.0).view(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clip_frac = L.ppo_value_loss(values, old, returns, mask, clip=0.2)
    # t0: unclipped 0.25, clipped (0.2-1)^2 = 0.64 -> 0.64 (clip active)
    # t1: both 0.81; t2: unclipped 0.25 beats clipped 0.04 -> 0.25
    close(loss, 0.5 * (0.64 + 0.81 + 0.25) / 3)
    close(clip_frac, 1 / 3)


def test_group_advantages_grpo_and_rloo():
    r = t(1.0, 2.0, 3.0, 6.0, 4.0, 4.0, 4.0, 4.0)
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # group 1 mean 3, unbiased std
    close(L.group_advantages(r, 4), [c / (std + 1e-4) for c in (-2, -1, 0, 3)] + [0.0] * 4)
    close(L.group_advantages(r, 4, normalize_std=False), [-2, -1, 0, 3, 0, 0, 0, 0])
    # leave-one-out baselines: (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3
    close(L.group_advantages(r, 4, rloo=True),
          [1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2, 0, 0, 0, 0])
    with pytest.raises(ValueError):
        L.group_advantages(r, 3)
    with pytest.raises(ValueError):
        L.group_advantages(r, 1)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 40.0]])
    values = torch.tensor([[1.0, 2.0, 2.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # residuals [0, 0, 1]: var 2/9; returns var 2/3 -> 1 - 1/3
    close(L.explained_variance(values, returns, mask), 2 / 3)
    close(L.explained_variance(returns, returns, mask), 1.0)
    assert torch.isnan(L.explained_variance(values, torch.ones(1, 4), mask))


def test_k3_kl_penalty_by_hand_on_both_sides_and_at_the_clamp():
    # d = logp - ref = 0.5, -1, 0, 30 (clamped to 20): k3 = exp(-d) - 1 + d
    got = L.kl_penalty(t(-0.5, -3.0, -2.0, 0.0), t(-1.0, -2.0, -2.0, -30.0), "k3")
    close(got, [math.exp(-0.5) - 0.5, math.e - 2, 0.0, math.exp(-20) + 19], tol=1e-6)


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, -7.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # kept 1, 2, 3, 4: mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5 / 3
    s = math.sqrt(5 / 3 + 1e-8)
    close(L.masked_whiten(x, m), [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, 0.0, 0.0])
    close(L.masked_whiten(x, m, shift_mean=False), [2.5 - 1.5 / s, 2.5 - 0.5 / s, 2.5 + 0.5 / s, 2.5 + 1.5 / s,
                                                     0.0, 0.0])


def test_head_cross_entropy_equals_the_loss_of_the_whole_logits_under_autocast():
    from tinygpt.losses import head_cross_entropy
    torch.manual_seed(0)
    h = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (2, 9))
    t[0, :3] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = L.token_cross_entropy(h @ w.t(), t)
        got = head_cross_entropy(h, w, t, chunk=4)
    gh, gw = torch.autograd.grad(want, (h, w))
    dh, dw = torch.autograd.grad(got, (h, w))
    assert got.dtype == torch.float32 and dw.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)        # both from bf16 logits
    torch.testing.assert_close(dh, gh, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw, gw, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_the_compiled_chunk_of_the_head_loss_equals_the_plain_one():
    from tinygpt.losses.head import _chunk_loss_and_grad
    torch.manual_seed(0)
    logits = torch.randn(12, 70, dtype=torch.bfloat16)
    t = torch.randint(0, 70, (12, 1))
    keep = torch.rand(12, 1) > 0.3
    want = _chunk_loss_and_grad(logits, t, keep, True)
    got = torch.compile(_chunk_loss_and_grad, dynamic=False)(logits, t, keep, True)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1].float(), want[1].float(), atol=1e-2, rtol=1e-2)
    ref = torch.softmax(logits.float(), -1) - torch.nn.functional.one_hot(t[:, 0], 70)
    torch.testing.assert_close(want[1].float(), ref * keep, atol=1e-2, rtol=1e-2)
