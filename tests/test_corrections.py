"""Off-policy importance weights (core.corrections): float64 arithmetic written out, every level x
treatment, rejection, both denominator policies, self-normalization and the config checks."""

import math

import pytest
import torch

from megatron_rl_agg.core.config import LossConfig
from megatron_rl_agg.core.corrections import (LOSS_TOKEN, MASKED, REJECTED, TRUNCATED,
                                              correction_metrics, importance_weights, self_normalize)

# Two rows, token ratios pi_prox / pi_behave:
#   row 0: [2, 0.5, 4]   (3 loss tokens)
#   row 1: [3, 1, pad]   (2 loss tokens, the last position is not a loss token)
RATIOS = torch.tensor([[2.0, 0.5, 4.0], [3.0, 1.0, 7.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
BEHAVE = torch.full((2, 3), -1.5, dtype=torch.float64)
PROX = BEHAVE + RATIOS.log()
M = MASK.bool()
CBRT4, SQRT3 = 4 ** (1 / 3), 3 ** 0.5     # geometric means: (2 * 0.5 * 4)^(1/3), (3 * 1)^(1/2)


def w(level, mode="truncate", low=0.0, high=100.0, veto=None, denominator="keep_count"):
    return importance_weights(PROX, BEHAVE, MASK, level=level, mode=mode, low=low, high=high, veto=veto,
                              denominator=denominator)


def check(out, expected, flag=None, expected_flags=None):
    exp = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(out.weights, exp, rtol=1e-12, atol=0)
    if flag is not None:
        got = ((out.flags & flag) > 0).to(torch.int64)
        assert got.tolist() == expected_flags


# ---- levels, no treatment active (bound 100) ----

def test_token_level():
    check(w("token"), [[2, 0.5, 4], [3, 1, 0]])       # exp(d) per token; 0 off the mask


def test_sequence_level_is_the_product():
    # row 0: exp(ln 2 + ln 0.5 + ln 4) = 2 * 0.5 * 4 = 4; row 1: 3 * 1 = 3 (the pad's 7 not included)
    check(w("sequence"), [[4, 4, 4], [3, 3, 0]])
    assert not torch.allclose(w("sequence").weights[0, 0], torch.tensor(CBRT4, dtype=torch.float64))


def test_geometric_level_is_the_mean():
    # row 0: exp((ln 2 + ln 0.5 + ln 4) / 3) = 4^(1/3) = 1.5874; row 1: exp(ln 3 / 2) = sqrt 3 = 1.7321
    check(w("geometric"), [[CBRT4] * 3, [SQRT3, SQRT3, 0]])
    assert not math.isclose(float(w("geometric").weights[0, 0]), 4.0)


def test_off_measures_only():
    out = w("off")
    check(out, MASK.tolist())
    torch.testing.assert_close(out.log_ratio, torch.where(M, RATIOS.log(), 0.0))


# ---- treatments x levels ----

def test_truncate():
    # token, cap 2.5: [2, 0.5, min(4, 2.5)], [min(3, 2.5), 1]
    check(w("token", high=2.5), [[2, 0.5, 2.5], [2.5, 1, 0]], TRUNCATED, [[0, 0, 1], [1, 0, 0]])
    # sequence: min(4, 2.5), min(3, 2.5) on every token of the row
    check(w("sequence", high=2.5), [[2.5] * 3, [2.5, 2.5, 0]], TRUNCATED, [[1, 1, 1], [1, 1, 0]])
    # geometric: 1.587 and 1.732 are under 2.5: untouched
    check(w("geometric", high=2.5), [[CBRT4] * 3, [SQRT3, SQRT3, 0]], TRUNCATED, [[0, 0, 0], [0, 0, 0]])


def test_clip():
    # token, [0.6, 2.5]: 0.5 -> 0.6 (below), 4 -> 2.5, 3 -> 2.5
    check(w("token", "clip", 0.6, 2.5), [[2, 0.6, 2.5], [2.5, 1, 0]], TRUNCATED, [[0, 1, 1], [1, 0, 0]])
    # sequence, [0.6, 3.5]: 4 -> 3.5, 3 stays
    check(w("sequence", "clip", 0.6, 3.5), [[3.5] * 3, [3, 3, 0]], TRUNCATED, [[1, 1, 1], [0, 0, 0]])
    # geometric, [1.6, 1.7]: 1.587 -> 1.6 (below), 1.732 -> 1.7 (above)
    check(w("geometric", "clip", 1.6, 1.7), [[1.6] * 3, [1.7, 1.7, 0]], TRUNCATED, [[1, 1, 1], [1, 1, 0]])


def test_mask():
    # token, [0.6, 2.5]: 0.5, 4 and 3 are outside -> 0
    check(w("token", "mask", 0.6, 2.5), [[2, 0, 0], [0, 1, 0]], MASKED, [[0, 1, 1], [1, 0, 0]])
    # sequence, [0.6, 3.5]: row 0 (4) masked, row 1 (3) kept
    check(w("sequence", "mask", 0.6, 3.5), [[0] * 3, [3, 3, 0]], MASKED, [[1, 1, 1], [0, 0, 0]])
    # geometric, [0.6, 1.65]: row 0 (1.587) kept, row 1 (1.732) masked
    check(w("geometric", "mask", 0.6, 1.65), [[CBRT4] * 3, [0, 0, 0]], MASKED, [[0, 0, 0], [1, 1, 0]])


def test_veto_rejects_whole_rows():
    # veto 0.3: a token ratio < 0.3 or > 1/0.3 = 3.33 rejects its row; row 0 holds 4 -> rejected, row 1's
    # largest is 3 (its pad's 7 is not a loss token) -> kept.
    out = w("token", high=3.2, veto=0.3)
    check(out, [[0, 0, 0], [3, 1, 0]], REJECTED, [[1, 1, 1], [0, 0, 0]])
    assert ((out.flags & TRUNCATED) > 0).sum() == 0      # a rejected token is not also counted truncated


def test_denominators():
    # keep_count: rejected (row 0) and masked tokens stay in the counts; survivors: they leave them.
    kept = w("token", high=3.2, veto=0.3)
    assert kept.counted.tolist() == MASK.tolist()               # 5 counted tokens, not 2
    surv = w("token", high=3.2, veto=0.3, denominator="survivors")
    assert surv.counted.tolist() == [[0, 0, 0], [1, 1, 0]]       # 2 survivors
    masked = w("token", "mask", 0.6, 2.5, denominator="survivors")
    assert masked.counted.tolist() == [[1, 0, 0], [0, 1, 0]]
    assert ((kept.flags & LOSS_TOKEN) > 0).tolist() == M.tolist()   # metrics still see every loss token


def test_self_normalize():
    # token, cap 2.5: weights 2 + 0.5 + 2.5 + 2.5 + 1 = 8.5 over n = 5 tokens -> multiply by 5 / 8.5
    out = w("token", high=2.5)
    total = torch.stack([(out.weights * out.counted).sum(), out.counted.sum()])
    assert total.tolist() == [8.5, 5.0]
    normed = self_normalize(out.weights, total)
    torch.testing.assert_close(normed, out.weights * (5 / 8.5), rtol=1e-15, atol=0)
    assert float((normed * out.counted).sum()) == pytest.approx(5.0, rel=1e-15)
    # every weight 0: stays 0 (no division by zero)
    zero = torch.zeros(2, 3, dtype=torch.float64)
    assert self_normalize(zero, torch.tensor([0.0, 5.0], dtype=torch.float64)).tolist() == zero.tolist()


def test_log_ratio_clamped_at_20():
    # d = 50 per token: token level exp(min(50, 20)); sequence exp(min(150, 20)); no inf
    prox, behave = torch.full((1, 3), 0.0, dtype=torch.float64), torch.full((1, 3), -50.0, dtype=torch.float64)
    one = torch.ones(1, 3, dtype=torch.float64)
    for level in ("token", "sequence", "geometric"):
        out = importance_weights(prox, behave, one, level=level, high=1e12)
        torch.testing.assert_close(out.weights, torch.full((1, 3), math.exp(20), dtype=torch.float64))
        out = importance_weights(behave, prox, one, level=level, high=1e12)
        torch.testing.assert_close(out.weights, torch.full((1, 3), math.exp(-20), dtype=torch.float64))


def test_metrics_of_known_ratios():
    out = w("token", "clip", 0.6, 2.5)
    rep = correction_metrics(out.weights, out.log_ratio, out.flags)
    # weights [2, 0.6, 2.5, 2.5, 1]: sum 8.6 over 5; max 2.5; min 0.6
    assert rep["is_weight/mean"].tolist() == pytest.approx([8.6, 5])
    assert float(rep["is_weight/max"]) == 2.5 and float(rep["is_weight/min"]) == pytest.approx(0.6)
    # d = logp_behave - logp_prox = -ln r per token: k1 sum = -ln(2 * 0.5 * 4 * 3 * 1) = -ln 12
    assert rep["mismatch_kl_k1/mean"].tolist() == pytest.approx([-math.log(12), 5])
    # k3 = exp(-d) - 1 + d = r - 1 - ln r: sum = (2 + 0.5 + 4 + 3 + 1) - 5 - ln 12
    assert rep["mismatch_kl_k3/mean"].tolist() == pytest.approx([10.5 - 5 - math.log(12), 5])
    assert rep["is_truncated_frac/mean"].tolist() == [3, 5]
    assert rep["is_masked_frac/mean"].tolist() == [0, 5] and rep["is_rejected_frac/mean"].tolist() == [0, 5]


@pytest.mark.parametrize("kwargs, message", [
    (dict(is_low=3.0), "--is-low=3.0 is above --is-high=2.0"),
    (dict(is_mode="mask", is_low=0.5, is_veto=0.6), "--is-veto=0.6 is above the lower bound --is-low=0.5"),
    (dict(is_veto=0.9), "1 / --is-veto"),
    (dict(is_veto=1.5), "is_veto (--is-veto) must be in"),
    (dict(is_level="product"), "--is-level must be one of off, token, sequence, geometric"),
    (dict(is_mode="cap"), "--is-mode must be one of truncate, clip, mask"),
    (dict(is_denominator="all"), "--is-denominator must be one of keep_count, survivors"),
    (dict(is_high=float("nan")), "is_high (--is-high) must be a finite number"),
])
def test_config_errors_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        LossConfig(**kwargs)
