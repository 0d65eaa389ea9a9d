"""The policy-loss registry (core/policy_losses.py): value AND gradient of every loss on tiny float64
tensors against a reference written here from each paper's formula, with the arithmetic in comments.

Cases that a wrong implementation fails: clip sides swapped (asymmetric bounds, a ratio outside one of
them), the sequence mean over the padded length (a row with a padded position holding a large log-ratio
and fewer loss tokens than T), GMPO ignoring the sign of the advantage (a negative-advantage row whose
clipped side differs), SAPO's two temperatures swapped.
"""

import math

import pytest
import torch

from megatron_rl_agg.core.aggregation import aggregate
from megatron_rl_agg.core.config import LossConfig
from megatron_rl_agg.core.policy_losses import (POLICY_LOSSES, get_policy_loss, ppo_clipped_surrogate,
                                                sequence_mean)

D = torch.float64
# Two rows of T = 3: row 0 has 3 loss tokens, row 1 has 2 (its last position is padding, whose log-ratio
# 5.0 must not reach the sequence mean).
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=D)
OLD = torch.full((2, 3), -2.0, dtype=D)


def _logp(log_ratio):
    """Current log-probs with the given log-ratios to OLD, as a leaf with a gradient."""
    return (OLD + torch.tensor(log_ratio, dtype=D)).requires_grad_(True)


def _run(name, log_ratio, adv, mode, **params):
    """Registry loss aggregated by ``mode``; the sequence-level input computed like the caller does."""
    loss = get_policy_loss(name)
    logp = _logp(log_ratio)
    adv = torch.tensor(adv, dtype=D)
    seq = None
    if loss.level == "sequence":
        lr = (logp - OLD).clamp(-20, 20)
        seq = sequence_mean(loss.seq_token_log_ratio(lr, adv, **params), MASK)
    per_token, clipped, masked = loss(logp, OLD, adv, seq_log_ratio=seq, **params)
    value = aggregate(per_token, MASK, mode)
    value.backward()
    return float(value), logp.grad, clipped.bool() & MASK.bool(), masked.bool() & MASK.bool()


# ------------------------------------------------------------------------------------------------
# GSPO: s_i = exp((1/|y_i|) sum_t log r_{i,t});  J = (1/G) sum_i min(s_i A_i, clip(s_i, 1-el, 1+eh) A_i)
# ------------------------------------------------------------------------------------------------

def _gspo_reference(log_ratio, adv, el, eh):
    logp = _logp(log_ratio)
    lr = logp - OLD
    s = torch.exp((lr * MASK).sum(-1) / MASK.sum(-1))             # the paper's |y_i|, not T
    a = torch.tensor(adv, dtype=D)
    j = torch.minimum(s * a, torch.clamp(s, 1 - el, 1 + eh) * a).mean()
    (-j).backward()
    return float(-j), logp.grad


def test_gspo_value_and_gradient_equal_the_paper():
    # row 0: log r = (0.3, -0.1, 0.1), mean 0.1, s0 = e^0.1 = 1.10517, A0 = +1, inside [0.9, 1.3]
    #        -> L0 = -1.10517; d L0 / d logp_t = -s0 / 3 = -0.36839 on each token
    # row 1: log r = (0.2, -0.4, pad 5.0), mean over its 2 tokens -0.1 (over T = 3 it would be +1.6),
    #        s1 = e^-0.1 = 0.90484, A1 = -1 -> L1 = +0.90484, d L1 / d logp_t = s1 / 2 = 0.45242, pad 0
    # seq_mean_token_mean: J = (L0 + L1) / 2 = -0.10017; gradients halved.
    lr, adv = [[0.3, -0.1, 0.1], [0.2, -0.4, 5.0]], [1.0, -1.0]
    value, grad, clipped, _ = _run("gspo", lr, adv, "seq_mean_token_mean", clip_eps_low=0.1, clip_eps_high=0.3)
    ref_value, ref_grad = _gspo_reference(lr, adv, 0.1, 0.3)
    assert value == pytest.approx(ref_value, rel=1e-12)
    assert value == pytest.approx((-math.exp(0.1) + math.exp(-0.1)) / 2, rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=0)
    assert grad[0, 0].item() == pytest.approx(-math.exp(0.1) / 3 / 2)
    assert grad[1].tolist()[:2] == pytest.approx([math.exp(-0.1) / 2 / 2] * 2) and grad[1, 2] == 0
    assert not clipped.any()


def test_gspo_clip_sides():
    # row 0: mean log r 0.3, s0 = e^0.3 = 1.34986 > 1 + eh = 1.3 with A0 = +1 -> clipped: L0 = -1.3, grad 0
    # row 1: mean log r -0.3 -> s1 = e^-0.3 = 0.74082 < 1 - el = 0.9 with A1 = -1 -> clipped: L1 = +0.9
    # J = (-1.3 + 0.9) / 2 = -0.2. With the sides swapped ([0.7, 1.1]) it would be (-1.1 + 0.74082) / 2.
    lr, adv = [[0.3, 0.3, 0.3], [-0.3, -0.3, 5.0]], [1.0, -1.0]
    value, grad, clipped, _ = _run("gspo", lr, adv, "seq_mean_token_mean", clip_eps_low=0.1, clip_eps_high=0.3)
    assert value == pytest.approx(-0.2, rel=1e-12)
    assert grad.abs().max() == 0 and clipped.sum() == 5
    ref_value, ref_grad = _gspo_reference(lr, adv, 0.1, 0.3)
    assert value == pytest.approx(ref_value, rel=1e-12)


def test_gspo_token_equals_gspo_for_row_advantages():
    # GSPO-token: s_{i,t} = sg(s_i) pi/sg(pi): value s_i, gradient s_i d logp_t; with seq_mean_token_mean
    # each token gets s_i / |y_i| like GSPO's (the paper's equivalence for one advantage per row).
    lr, adv = [[0.3, -0.1, 0.1], [0.2, -0.4, 5.0]], [1.0, -1.0]
    got = _run("gspo_token", lr, adv, "seq_mean_token_mean", clip_eps_low=0.1, clip_eps_high=0.3)
    ref = _run("gspo", lr, adv, "seq_mean_token_mean", clip_eps_low=0.1, clip_eps_high=0.3)
    assert got[0] == pytest.approx(ref[0], rel=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-15)
    # with token_mean the weighting differs: each token has weight 1/N = 1/5, so d/d logp_{0,t} = -s0/5
    tm = _run("gspo_token", lr, adv, "token_mean", clip_eps_low=0.1, clip_eps_high=0.3)
    assert tm[1][0, 0].item() == pytest.approx(-math.exp(0.1) / 5)


# ------------------------------------------------------------------------------------------------
# GMPO: R_i = exp(mean_t sgn(A) min(sgn(A) x_t, sgn(A) clip(x_t, -el, eh))),  J = (1/G) sum_i A_i R_i
# ------------------------------------------------------------------------------------------------

def test_gmpo_value_gradient_and_the_sign_of_the_advantage():
    # row 0, A0 = +2: log r = (0.6, -0.2, 0.1), eps 0.4: A > 0 caps above only -> (0.4, -0.2, 0.1),
    #        mean 0.1, R0 = e^0.1; L0 = -2 e^0.1 = -2.21034; grad: token 0 clipped -> 0, others -2 R0 / 3
    # row 1, A1 = -1: log r = (-0.6, 0.2, pad 5.0): A < 0 floors below only -> (-0.4, 0.2), mean -0.1,
    #        R1 = e^-0.1; L1 = +e^-0.1 = 0.90484; grad: token 0 clipped -> 0, token 1 = R1 / 2
    #        (ignoring the sign, min(x, clip(x)) would keep -0.6: mean -0.2 and R1 = e^-0.2)
    # J = (L0 + L1) / 2 = -0.65275
    lr, adv = [[0.6, -0.2, 0.1], [-0.6, 0.2, 5.0]], [2.0, -1.0]
    value, grad, clipped, _ = _run("gmpo", lr, adv, "seq_mean_token_mean", clip_eps_low=0.4, clip_eps_high=0.4)
    r0, r1 = math.exp(0.1), math.exp(-0.1)
    assert value == pytest.approx((-2 * r0 + r1) / 2, rel=1e-12)
    expected = torch.tensor([[0.0, -2 * r0 / 3, -2 * r0 / 3], [0.0, r1 / 2, 0.0]], dtype=D) / 2
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
    assert clipped.tolist() == [[True, False, False], [True, False, False]]

    # reference straight from the paper's product form: (prod_t |min(r A, clip(r) A)|)^(1/|o|) sgn(A)
    logp = _logp(lr)
    r = torch.exp(logp - OLD)
    a = torch.tensor(adv, dtype=D).unsqueeze(-1)
    lo, hi = math.exp(-0.4), math.exp(0.4)
    term = torch.minimum(r * a, torch.clamp(r, lo, hi) * a).abs()
    geo = torch.exp((torch.log(term) * MASK).sum(-1) / MASK.sum(-1)) * torch.sign(a.squeeze(-1))
    # the paper's |A| inside the product: geo = |A| R sgn(A) = A R
    (-geo.mean()).backward()
    assert value == pytest.approx(float(-geo.mean()), rel=1e-12)
    torch.testing.assert_close(grad, logp.grad, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# CISPO: J = (1 / sum|o_i|) sum_{i,t} sg(clip(r, 1-el, 1+eh)) A log pi
# ------------------------------------------------------------------------------------------------

def test_cispo_value_and_gradient_equal_the_paper():
    # eps_low 1 (no lower bound), eps_high 0.28: r = e^(0.5, 0, -1) -> weights (1.28, 1, e^-1) for row 0;
    # row 1: r = e^(0.1, -0.3) -> weights (e^0.1, e^-0.3). A = (+1, -1), logp = -2 + log r.
    # token_mean over 5 tokens: J = sum_t w A logp / 5; loss = -J; d loss / d logp_t = -w_t A / 5
    # (every token keeps a gradient; only the weight is clipped).
    lr, adv = [[0.5, 0.0, -1.0], [0.1, -0.3, 5.0]], [1.0, -1.0]
    value, grad, clipped, _ = _run("cispo", lr, adv, "token_mean", clip_eps_low=1.0, clip_eps_high=0.28)
    w = torch.tensor([[1.28, 1.0, math.exp(-1)], [math.exp(0.1), math.exp(-0.3), 0.0]], dtype=D)
    a = torch.tensor([[1.0], [-1.0]], dtype=D)
    logp = OLD + torch.tensor(lr, dtype=D)
    assert value == pytest.approx(float(-(w * a * logp * MASK).sum() / 5), rel=1e-12)
    torch.testing.assert_close(grad, -w * a * MASK / 5, rtol=1e-12, atol=1e-15)
    assert clipped.tolist() == [[True, False, False], [False, False, False]]
    # sides: with eps_low 0.1 the weight e^-1 is floored at 0.9; swapped (0.28 below, 0.1 above) the
    # first token would get 1.1 instead of 1.28
    _, g2, _, _ = _run("cispo", lr, adv, "token_mean", clip_eps_low=0.1, clip_eps_high=0.28)
    assert g2[0].tolist() == pytest.approx([-1.28 / 5, -1 / 5, -0.9 / 5])


# ------------------------------------------------------------------------------------------------
# SAPO: f(r) = (4 / tau) sigmoid(tau (r - 1)), tau = tau_pos if A > 0 else tau_neg;  loss = -f(r) A
# ------------------------------------------------------------------------------------------------

def test_sapo_value_gradient_and_temperatures():
    # row 0 A = +1, tau 1: r = e^0.5 = 1.64872, f = 4 sigmoid(0.64872) = 2.62680; grad -4 s(1-s) r
    # row 1 A = -1, tau 3: r = e^-0.5 = 0.60653, f = (4/3) sigmoid(-1.18041) = 0.31536, grad +4 s(1-s) r
    # at r = 1 (token 1 of each row): f = 2 / tau, grad = -A r (the plain policy gradient)
    lr, adv = [[0.5, 0.0, 0.0], [-0.5, 0.0, 5.0]], [1.0, -1.0]
    value, grad, _, _ = _run("sapo", lr, adv, "token_sum", tau_pos=1.0, tau_neg=3.0)
    r = torch.exp(torch.tensor(lr, dtype=D))
    tau = torch.tensor([[1.0], [3.0]], dtype=D)
    a = torch.tensor([[1.0], [-1.0]], dtype=D)
    s = torch.sigmoid(tau * (r - 1))
    assert value == pytest.approx(float((-(4 / tau) * s * a * MASK).sum()), rel=1e-12)
    torch.testing.assert_close(grad, -4 * s * (1 - s) * r * a * MASK, rtol=1e-12, atol=1e-15)
    assert grad[0, 1].item() == pytest.approx(-1.0) and grad[1, 1].item() == pytest.approx(1.0)
    swapped, _, _, _ = _run("sapo", lr, adv, "token_sum", tau_pos=3.0, tau_neg=1.0)
    assert swapped != pytest.approx(value)


# ------------------------------------------------------------------------------------------------
# DPPO: -A r inside the trust region; no gradient outside it on the side the advantage pushes toward
# ------------------------------------------------------------------------------------------------

def test_dppo_tv_masks_tokens_outside_the_trust_region():
    # OLD = log 0.5 here. Row 0 (A = +1): p = (0.8, 0.55, 0.2): |p - 0.5| = (0.3, 0.05, 0.3), delta 0.2:
    #   token 0 moved up beyond delta with A > 0 -> masked (grad 0); token 1 inside -> grad -r = -1.1;
    #   token 2 moved down beyond delta but A > 0 pushes up -> kept, grad -r = -0.4.
    # Row 1 (A = -1): p = (0.2, 0.45): token 0 down beyond delta with A < 0 -> masked; token 1 grad +0.9.
    old = torch.full((2, 3), math.log(0.5), dtype=D)
    p = torch.tensor([[0.8, 0.55, 0.2], [0.2, 0.45, 0.5]], dtype=D)
    logp = p.log().requires_grad_(True)
    loss, _, masked = get_policy_loss("dppo_tv")(logp, old, torch.tensor([1.0, -1.0], dtype=D),
                                                 dppo_tv_delta=0.2)
    (loss * MASK).sum().backward()
    r = p / 0.5
    torch.testing.assert_close(loss, -torch.tensor([[1.0], [-1.0]], dtype=D) * r)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.1, -0.4], [0.0, 0.9, 0.0]], dtype=D))
    assert (masked.bool() & MASK.bool()).tolist() == [[True, False, False], [True, False, False]]


def test_dppo_kl_masks_by_binary_kl():
    # p_old = 0.5; p = 0.8: KL = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2) = 0.22314 > 0.05 -> masked (A > 0, up);
    # p = 0.55: KL = 0.5 ln(0.5/0.55) + 0.5 ln(0.5/0.45) = 0.00503 -> kept, grad -1.1.
    old = torch.full((1, 2), math.log(0.5), dtype=D)
    logp = torch.tensor([[0.8, 0.55]], dtype=D).log().requires_grad_(True)
    loss, _, masked = get_policy_loss("dppo_kl")(logp, old, torch.tensor([1.0], dtype=D), dppo_kl_delta=0.05)
    loss.sum().backward()
    assert masked.tolist() == [[True, False]]
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.1]], dtype=D))


def test_ppo_clip_in_the_registry_is_the_surrogate():
    logp, adv = _logp([[0.5, 0.0, -1.0], [0.1, -0.3, 5.0]]), torch.tensor([1.0, -1.0], dtype=D)
    got = get_policy_loss("vanilla")(logp, OLD, adv, clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=3.0)
    ref = ppo_clipped_surrogate(logp, OLD, adv, clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=3.0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_sequence_mean_uses_the_loss_tokens():
    # row 1: (0.2 - 0.4) / 2 = -0.1 (the padded 5.0 excluded, divided by 2 not 3); an empty row gives 0
    values = torch.tensor([[0.3, -0.1, 0.1], [0.2, -0.4, 5.0], [1.0, 1.0, 1.0]], dtype=D)
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=D)])
    assert sequence_mean(values, mask).tolist() == pytest.approx([0.1, -0.1, 0.0])


# ------------------------------------------------------------------------------------------------
# registry and configuration
# ------------------------------------------------------------------------------------------------

def test_registry_names_levels_and_aliases():
    assert list(POLICY_LOSSES) == ["ppo_clip", "gspo", "gspo_token", "gmpo", "cispo", "sapo", "dppo_tv",
                                   "dppo_kl"]
    assert {n for n, p in POLICY_LOSSES.items() if p.level == "sequence"} == {"gspo", "gspo_token", "gmpo"}
    assert get_policy_loss("Geo-Mean").name == "gmpo" and get_policy_loss("vanilla").name == "ppo_clip"
    with pytest.raises(ValueError, match="unknown policy loss 'grpo'; valid: ppo_clip, gspo, gspo_token, gmpo"):
        get_policy_loss("grpo")


def test_config_paper_defaults_and_refusals():
    assert LossConfig(policy_loss="gspo").policy_loss_params == {"clip_eps_low": 3e-4, "clip_eps_high": 4e-4}
    assert LossConfig(policy_loss="geo_mean").policy_loss == "gmpo"
    assert LossConfig(policy_loss="sapo").policy_loss_params == {"tau_pos": 1.0, "tau_neg": 1.05}
    assert LossConfig().policy_loss_params == {"clip_eps_low": 0.2, "clip_eps_high": 0.2, "dual_clip_c": None}
    for kwargs, match in [
        (dict(policy_loss="nope"), r"policy_loss \(--policy-loss\): unknown policy loss 'nope'; valid: ppo_clip"),
        (dict(policy_loss="sapo", tau_neg=0.0), r"tau_neg \(--tau-neg\) must be > 0, got 0.0"),
        (dict(policy_loss="dppo_tv", dppo_tv_delta=1.5), r"dppo_tv_delta \(--dppo-tv-delta\) must be in"),
        (dict(policy_loss="dppo_kl", dppo_kl_delta=float("nan")), r"dppo_kl_delta \(--dppo-kl-delta\) must be a"),
        (dict(policy_loss="cispo", clip_eps_low=1.5), r"clip_eps_low \(--clip-eps-low\) must be in \[0, 1\]"),
        (dict(policy_loss="gspo", dual_clip_c=3.0), r"dual_clip_c \(--dual-clip-c\) is a parameter of ppo_clip"),
        (dict(policy_loss="sapo", clip_eps_high=0.3), r"clip_eps_high \(--clip-eps-high\) is a parameter of"),
    ]:
        with pytest.raises(ValueError, match=match):
            LossConfig(**kwargs)
