"""Per-token loss terms on tiny tensors, expected values worked out by hand in the comments."""

import math

import pytest
import torch

from megatron_rl_agg.core import config
from megatron_rl_agg.core.kl import KL_ESTIMATORS, kl_estimate, register_kl_estimator
from megatron_rl_agg.core.logits import entropy_from_logits, logprobs_from_logits
from megatron_rl_agg.core.policy_losses import ppo_clipped_surrogate


def _logp_for_ratios(ratios, old=-1.0):
    """Current log-probs (leaf, requires grad) with exp(logp - old) == ratios, and the old log-probs."""
    r = torch.tensor([ratios], dtype=torch.float64)
    old_lp = torch.full_like(r, old)
    lp = (old_lp + r.log()).requires_grad_(True)
    return lp, old_lp


def test_clip_low_high_positive_advantage():
    # A = +1, eps_low = 0.2, eps_high = 0.28, band [0.8, 1.28]. Per token:
    #   r=0.5 : -A r = -0.5, -A clip(r) = -0.8  -> max -0.5 (unclipped; d/dlogp = -A r = -0.5)
    #   r=0.9 : -0.9 both                        -> -0.9 (d/dlogp = -0.9)
    #   r=1.1 : -1.1 both                        -> -1.1 (d/dlogp = -1.1)
    #   r=1.5 : -1.5 vs -1.28                    -> -1.28 clipped (gradient 0)
    lp, old = _logp_for_ratios([0.5, 0.9, 1.1, 1.5])
    loss, clipped, dual = ppo_clipped_surrogate(
        lp, old, torch.tensor([1.0], dtype=torch.float64), clip_eps_low=0.2, clip_eps_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -0.9, -1.1, -1.28]], dtype=torch.float64))
    assert clipped.tolist() == [[False, False, False, True]]
    assert not dual.any()
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5, -0.9, -1.1, 0.0]], dtype=torch.float64))


def test_clip_low_high_negative_advantage():
    # A = -2, same band [0.8, 1.28]:
    #   r=0.5 : -A r = 1.0, -A clip(r) = 1.6     -> 1.6 clipped (gradient 0)
    #   r=0.9 : 1.8 both                         -> 1.8 (d/dlogp = -A r = 1.8)
    #   r=1.5 : 3.0 vs 2.56                      -> 3.0 unclipped (d/dlogp = 3.0)
    lp, old = _logp_for_ratios([0.5, 0.9, 1.5])
    adv = torch.full((1, 3), -2.0, dtype=torch.float64)
    loss, clipped, _ = ppo_clipped_surrogate(lp, old, adv, clip_eps_low=0.2, clip_eps_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[1.6, 1.8, 3.0]], dtype=torch.float64))
    assert clipped.tolist() == [[True, False, False]]
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 1.8, 3.0]], dtype=torch.float64))


def test_dual_clip():
    # c = 3, band [0.8, 1.2]. Row advantages A = [-1, -1, +1]:
    #   A=-1, r=5 : max(5, 1.2) = 5 > c*|A| = 3  -> 3, dual-clipped (gradient 0), not counted as clipped
    #   A=-1, r=2 : max(2, 1.2) = 2 <= 3         -> 2 (d/dlogp = -A r = 2)
    #   A=+1, r=5 : max(-5, -1.2) = -1.2         -> -1.2 clipped; dual clip only acts on A < 0
    lp, old = _logp_for_ratios([5.0, 2.0, 5.0])
    adv = torch.tensor([[-1.0, -1.0, 1.0]], dtype=torch.float64)
    loss, clipped, dual = ppo_clipped_surrogate(
        lp, old, adv, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip_c=3.0)
    torch.testing.assert_close(loss, torch.tensor([[3.0, 2.0, -1.2]], dtype=torch.float64))
    assert dual.tolist() == [[True, False, False]]
    assert clipped.tolist() == [[False, False, True]]
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 2.0, 0.0]], dtype=torch.float64))
    # Without the dual clip the first token's loss is the unbounded 5.
    plain, _, _ = ppo_clipped_surrogate(lp, old, adv, clip_eps_low=0.2, clip_eps_high=0.2)
    assert plain[0, 0].item() == pytest.approx(5.0)


def test_row_advantages_broadcast_like_token_advantages():
    lp, old = _logp_for_ratios([0.7, 1.0, 1.4])
    row = ppo_clipped_surrogate(lp, old, torch.tensor([0.5], dtype=torch.float64),
                                       clip_eps_low=0.1, clip_eps_high=0.3)[0]
    tok = ppo_clipped_surrogate(lp, old, torch.full((1, 3), 0.5, dtype=torch.float64),
                                       clip_eps_low=0.1, clip_eps_high=0.3)[0]
    torch.testing.assert_close(row, tok)


def test_ratio_one_when_old_equals_current():
    # old = logp.detach(): r = 1, loss = -A, d/dlogp = -A (the on-policy policy gradient).
    lp = torch.tensor([[-0.3, -2.0]], dtype=torch.float64, requires_grad=True)
    loss, clipped, _ = ppo_clipped_surrogate(lp, lp.detach(), torch.tensor([[2.0, -1.0]]),
                                                    clip_eps_low=0.2, clip_eps_high=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-2.0, 1.0]], dtype=torch.float64))
    assert not clipped.any()
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-2.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("kwargs", [dict(clip_eps_low=-0.1, clip_eps_high=0.2),
                                    dict(clip_eps_low=0.2, clip_eps_high=0.2, dual_clip_c=1.0)])
def test_surrogate_rejects_bad_constants(kwargs):
    lp, old = _logp_for_ratios([1.0])
    with pytest.raises(ValueError, match="must be"):
        ppo_clipped_surrogate(lp, old, torch.ones(1), **kwargs)


LN2 = math.log(2.0)


@pytest.mark.parametrize("estimator, values, grads", [
    # d = logp - ref = [0, ln2, -ln2]
    # k1 = d = [0, 0.693147, -0.693147];                d k1/d logp = 1
    ("k1", [0.0, LN2, -LN2], [1.0, 1.0, 1.0]),
    # k2 = d^2/2 = [0, 0.240227, 0.240227];             d k2/d logp = d
    ("k2", [0.0, 0.5 * LN2 ** 2, 0.5 * LN2 ** 2], [0.0, LN2, -LN2]),
    # k3 = exp(-d) - 1 + d: [1-1+0, 0.5-1+0.693147, 2-1-0.693147] = [0, 0.193147, 0.306853]
    # d k3/d logp = 1 - exp(-d) = [0, 1 - 0.5, 1 - 2] = [0, 0.5, -1]
    ("k3", [0.0, 0.5 - 1 + LN2, 2 - 1 - LN2], [0.0, 0.5, -1.0]),
])
def test_kl_estimators_values_and_gradients(estimator, values, grads):
    ref = torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    lp = (ref.detach() + torch.tensor([[0.0, LN2, -LN2]], dtype=torch.float64)).requires_grad_(True)
    kl = kl_estimate(lp, ref, estimator)
    torch.testing.assert_close(kl, torch.tensor([values], dtype=torch.float64))
    kl.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([grads], dtype=torch.float64))
    assert ref.grad is None  # the reference is a constant


def test_k3_is_accurate_for_tiny_log_ratios():
    # k3(d) = d^2/2 - d^3/6 + O(d^4) = 5e-19 for d = 1e-9. The naive exp(-d) - 1 + d computes exp(-d)
    # next to 1, where the float64 spacing is 1.1e-16, so it is off by ~1e-16; expm1 is exact here.
    d = torch.tensor([[1e-9]], dtype=torch.float64)
    kl = kl_estimate(d, torch.zeros_like(d), "k3")
    assert kl.item() == pytest.approx(5e-19, rel=1e-6)
    naive = torch.exp(-d) - 1 + d
    assert abs(naive.item() - 5e-19) > 1e-17


def test_unknown_kl_estimator_lists_valid_names():
    with pytest.raises(ValueError, match=r"'k4'.*k1, k2, k3"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_kl_estimator_names_match_config():
    assert KL_ESTIMATORS == config.KL_ESTIMATORS == ("k1", "k2", "k3")


def test_duplicate_kl_registration_rejected():
    with pytest.raises(ValueError, match="registered twice"):
        register_kl_estimator("k1")(lambda d: d)


def test_full_logit_logprobs_and_entropy():
    # Row 0: uniform over 4 tokens: logp = -ln 4 = -1.386294, H = ln 4 = 1.386294.
    # Row 1: logits [0, ln 3, -inf-ish]: p = [1/4, 3/4, ~0];
    #   logp(label=1) = ln(3/4) = -0.287682
    #   H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.346574 + 0.215762 = 0.562335
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0]], [[0.0, math.log(3.0), -1e4, -1e4]]],
                          dtype=torch.float64)
    labels = torch.tensor([[2], [1]])
    lp = logprobs_from_logits(logits, labels)
    torch.testing.assert_close(lp, torch.tensor([[-math.log(4.0)], [math.log(0.75)]], dtype=torch.float64))
    h = entropy_from_logits(logits)
    expected_h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(h, torch.tensor([[math.log(4.0)], [expected_h]], dtype=torch.float64))


def test_entropy_gradient_matches_closed_form():
    # dH/dz_v = -p_v (log p_v + H), the standard softmax-entropy gradient.
    torch.manual_seed(0)
    z = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    h = entropy_from_logits(z)
    h.sum().backward()
    p = torch.softmax(z.detach(), -1)
    expected = -p * (p.log() + h.detach().unsqueeze(-1))
    torch.testing.assert_close(z.grad, expected)
