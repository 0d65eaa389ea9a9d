"""Advantage normalization: hand-computed values, the partial-group policies, errors, and property tests
against a brute-force per-group loop written here independently of megatron_rl_agg.core.advantages."""

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rl_agg.parallel import dist as agg_dist
from megatron_rl_agg.parallel.advantages import compute_step_advantages, normalize_advantages
from megatron_rl_agg.core.config import AdvantageConfig

LEVELS = ("group", "batch", "none")
SEED_REWARDS = [0.5, -0.5, 1, -1, 2, -2, 0, 3, 0, 1, 2, 100]
SEED_SIZES = [4, 4, 3, 1]


def t64(values):
    return torch.tensor(values, dtype=torch.float64)


def ids_from_sizes(sizes, stride=1, offset=0):
    return torch.repeat_interleave(torch.arange(len(sizes)) * stride + offset, torch.tensor(sizes))


# ----------------------------------------------------------------------------------------------
# Brute-force reference: plain Python, one group at a time.
# ----------------------------------------------------------------------------------------------

def reference(rewards, group_of_row, valid, mean_level, std_level, eps=1e-6, unbiased=True,
              leave_one_out=False, dropped=()):
    """Advantages by the documented definition, row by row, with math.fsum sums and no tensors."""
    n = len(rewards)
    members = {}
    for i in range(n):
        if valid[i] and group_of_row[i] not in dropped:
            members.setdefault(group_of_row[i], []).append(i)
    batch = [i for rows in members.values() for i in rows]
    out = []
    for i in range(n):
        g = group_of_row[i]
        if not valid[i] or g in dropped:
            out.append(0.0)
            continue
        level_rows = {"group": members[g], "batch": batch}
        used = {lvl for lvl in (mean_level, std_level) if lvl != "none"}
        if any(len(level_rows[lvl]) < 2 for lvl in used):
            out.append(0.0)
            continue
        x = rewards[i]
        if mean_level == "none":
            num = x
        else:
            rows = level_rows[mean_level]
            others = [rewards[j] for j in rows if j != i] if leave_one_out else [rewards[j] for j in rows]
            num = x - math.fsum(others) / len(others)
        if std_level == "none":
            out.append(num)
            continue
        vals = [rewards[j] for j in level_rows[std_level]]
        if len(set(vals)) == 1:  # no spread
            out.append(0.0)
            continue
        mu = math.fsum(vals) / len(vals)
        var = math.fsum((v - mu) ** 2 for v in vals) / (len(vals) - (1 if unbiased else 0))
        out.append(num / (math.sqrt(var) + eps))
    return out


# ----------------------------------------------------------------------------------------------
# Acceptance 1: the seeds' example, by hand
# ----------------------------------------------------------------------------------------------

def test_seed_example_by_hand():
    # Groups [4, 4, 3, 1], eps 1e-6, unbiased std:
    #  g0 = [.5, -.5, 1, -1]: mean 0, M2 = .25+.25+1+1 = 2.5, std = sqrt(2.5/3)  = 0.9128709
    #  g1 = [2, -2, 0, 3]:    mean .75, deviations 1.25, -2.75, -.75, 2.25,
    #                         M2 = 1.5625+7.5625+.5625+5.0625 = 14.75, std = sqrt(14.75/3) = 2.2173558
    #  g2 = [0, 1, 2]:        mean 1, M2 = 2, std = sqrt(2/2) = 1 -> -1/(1+1e-6) = -0.999999, 0, +0.999999
    #  g3 = [100]:            a single sample has no peer -> 0 (not 100/(1+eps) as a std=1 rule gives)
    s0, s1, s2 = math.sqrt(2.5 / 3), math.sqrt(14.75 / 3), 1.0
    e = 1e-6
    by_hand = [.5 / (s0 + e), -.5 / (s0 + e), 1 / (s0 + e), -1 / (s0 + e),
               1.25 / (s1 + e), -2.75 / (s1 + e), -.75 / (s1 + e), 2.25 / (s1 + e),
               -1 / (s2 + e), 0.0, 1 / (s2 + e), 0.0]
    adv = normalize_advantages(t64(SEED_REWARDS), group_sizes=SEED_SIZES)
    torch.testing.assert_close(adv, t64(by_hand), rtol=0, atol=1e-12)
    # the same vector to 6 decimals, as computed independently for the partial-group bug report
    published = [0.547722, -0.547722, 1.095444, -1.095444, 0.563734, -1.240215, -0.338241, 1.014722,
                 -0.999999, 0, 0.999999, 0]
    torch.testing.assert_close(adv, t64(published), rtol=0, atol=1e-6)
    assert 0.999998 < adv[10] < 1.0 and adv[11] == 0
    # same result from arbitrary (non-consecutive, negative) ids
    from_ids = normalize_advantages(t64(SEED_REWARDS), group_ids=ids_from_sizes(SEED_SIZES, 5, -7))
    torch.testing.assert_close(from_ids, adv, rtol=0, atol=0)


def test_trailing_partial_group_stays_bounded():
    # First 11 rows = groups [4, 4, 3]: a fixed stride of 4 would leave rows 8-10 with std 0 -> r/eps.
    adv = normalize_advantages(t64(SEED_REWARDS[:11]), group_sizes=[4, 4, 3])
    assert adv.abs().max() <= 10
    full = normalize_advantages(t64(SEED_REWARDS), group_sizes=SEED_SIZES)
    torch.testing.assert_close(adv, full[:11], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Levels, leave-one-out, the <2 and zero-spread rules (small cases by hand)
# ----------------------------------------------------------------------------------------------

def test_group_mean_batch_std_is_litePPO():
    # r = [0, 2 | 10, 14]: group means 1 and 12; batch mean 6.5,
    # batch M2 = 6.5^2 + 4.5^2 + 3.5^2 + 7.5^2 = 42.25+20.25+12.25+56.25 = 131, std = sqrt(131/3)
    r = t64([0, 2, 10, 14])
    sb = math.sqrt(131 / 3)
    adv = normalize_advantages(r, group_sizes=[2, 2], mean_level="group", std_level="batch", eps=0.0)
    torch.testing.assert_close(adv, t64([-1 / sb, 1 / sb, -2 / sb, 2 / sb]), rtol=0, atol=1e-14)


def test_batch_levels_need_no_groups():
    r = t64([1, 2, 3, 6])  # mean 3, M2 = 4+1+0+9 = 14, std = sqrt(14/3)
    s = math.sqrt(14 / 3)
    adv = normalize_advantages(r, mean_level="batch", std_level="batch", eps=0.0)
    torch.testing.assert_close(adv, t64([-2 / s, -1 / s, 0, 3 / s]), rtol=0, atol=1e-14)
    # population std: sqrt(14/4)
    adv = normalize_advantages(r, mean_level="batch", std_level="batch", eps=0.0, unbiased=False)
    torch.testing.assert_close(adv, t64([-2, -1, 0, 3]) / math.sqrt(3.5), rtol=0, atol=1e-14)
    # mean only
    adv = normalize_advantages(r, mean_level="batch", std_level="none")
    torch.testing.assert_close(adv, t64([-2, -1, 0, 3]))


def test_leave_one_out_baseline_and_std():
    # g = [1, 2, 6]: baselines mean of the others = 4, 3.5, 1.5 -> r - b = -3, -1.5, 4.5
    # (= 3/2 * (r - 3)). The std is the group's own: mean 3, M2 = 4+1+9 = 14, std = sqrt(7).
    r = t64([1, 2, 6])
    adv = normalize_advantages(r, group_sizes=[3], leave_one_out=True, std_level="none")
    torch.testing.assert_close(adv, t64([-3, -1.5, 4.5]), rtol=0, atol=1e-14)
    adv = normalize_advantages(r, group_sizes=[3], leave_one_out=True, eps=0.0)
    torch.testing.assert_close(adv, t64([-3, -1.5, 4.5]) / math.sqrt(7), rtol=0, atol=1e-14)
    # invalid rows are neither in the baseline nor in the std: [1, 2, (99 invalid), 6] -> same
    adv = normalize_advantages(t64([1, 2, 99, 6]), group_sizes=[4], valid=torch.tensor([1, 1, 0, 1]).bool(),
                               leave_one_out=True, std_level="none")
    torch.testing.assert_close(adv, t64([-3, -1.5, 0, 4.5]), rtol=0, atol=1e-14)


def test_mean_none_divides_raw_reward():
    # g = [1, 3]: std = sqrt(2), A = r / sqrt(2) (no centering)
    adv = normalize_advantages(t64([1, 3]), group_sizes=[2], mean_level="none", eps=0.0)
    torch.testing.assert_close(adv, t64([1, 3]) / math.sqrt(2), rtol=0, atol=1e-14)


@pytest.mark.parametrize("mean_level, std_level, loo", [
    (m, s, loo) for m in LEVELS for s in LEVELS for loo in (False, True) if not (loo and m == "none")])
def test_fewer_than_two_valid_rows_give_zero(mean_level, std_level, loo):
    groups = "group" in (mean_level, std_level)
    # a singleton group, a group of 3 whose only valid row is the last, and a group of 2
    r = t64([100.0, 5.0, 7.0, 9.0, 1.0, 4.0])
    valid = torch.tensor([1, 0, 0, 1, 1, 1]).bool()
    kw = dict(mean_level=mean_level, std_level=std_level, leave_one_out=loo, group_sizes=[1, 3, 2])
    adv = normalize_advantages(r, valid=valid, **kw)
    assert torch.isfinite(adv).all()
    assert adv[1] == 0 and adv[2] == 0  # invalid
    if groups:
        assert adv[0] == 0 and adv[3] == 0  # groups with < 2 valid rows
        assert adv[4] != 0 and adv[5] != 0
    # a batch with a single valid row: 0 whenever some level is used
    only = normalize_advantages(r, valid=torch.tensor([0, 0, 0, 1, 0, 0]).bool(), **kw)
    if mean_level == std_level == "none":
        torch.testing.assert_close(only, t64([0, 0, 0, 9.0, 0, 0]))
    else:
        assert (only == 0).all()


@pytest.mark.parametrize("mean_level", ["group", "batch", "none"])
def test_zero_spread_gives_zero_never_r_over_eps(mean_level):
    # group 0 has equal rewards 0.1 (std exactly 0); group 1 has a spread. With mean_level batch or none,
    # (r - mu)/(0 + eps) would be ~1e5..1e6; the rule gives 0. Offsets must not break exactness either.
    for offset in (0.0, 1e6):
        r = t64([0.1, 0.1, 0.1, 0.0, 1.0]) + offset
        adv = normalize_advantages(r, group_sizes=[3, 2], mean_level=mean_level, std_level="group")
        assert (adv[:3] == 0).all(), adv
        if mean_level != "none" or offset == 0:  # r / std of a raw 1e6 is large by definition
            assert adv.abs().max() < 10


def test_invalid_rows_may_hold_nan():
    r = t64([1.0, float("nan"), 3.0, float("inf")])
    valid = torch.tensor([True, False, True, False])
    adv = normalize_advantages(r, group_sizes=[4], valid=valid, eps=0.0)
    # valid [1, 3]: mean 2, std sqrt(2)
    torch.testing.assert_close(adv, t64([-1, 0, 1, 0]) / math.sqrt(2), rtol=0, atol=1e-14)


def test_dtype_is_preserved_and_stats_are_float64():
    r = torch.tensor([1e4 + 1, 1e4 + 2, 1e4 + 3], dtype=torch.float32)
    adv = normalize_advantages(r, group_sizes=[3])
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-6))
    assert normalize_advantages(r.bfloat16(), group_sizes=[3]).dtype == torch.bfloat16


def test_offset_robustness():
    g = torch.Generator().manual_seed(0)
    sizes = [5, 8, 3, 1, 8, 2] * 20
    noise = torch.randn(sum(sizes), generator=g, dtype=torch.float64)
    for mean_level, std_level in [("group", "group"), ("batch", "batch"), ("group", "batch")]:
        a = normalize_advantages(noise, group_sizes=sizes, mean_level=mean_level, std_level=std_level)
        b = normalize_advantages(noise + 1e6, group_sizes=sizes, mean_level=mean_level, std_level=std_level)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(), "group_sizes or group_ids.*no fixed-stride"),
    (dict(mean_level="batch", std_level="group"), "group_sizes or group_ids"),
    (dict(group_sizes=[2, 2], group_ids=torch.zeros(4, dtype=torch.int64)), "not both"),
    (dict(group_sizes=[2, 1]), r"sum to 3 but rewards has B = 4"),
    (dict(group_sizes=[2, 0, 2]), r"\(1, 0\)"),
    (dict(group_sizes=[5, -1]), r"\(1, -1\)"),
    (dict(group_sizes=[2.0, 2.0]), "must be ints"),
    (dict(group_ids=torch.tensor([0, 1, 0, 2])), r"contiguous.*\[0\]"),
    (dict(group_ids=torch.tensor([0, 0, 1])), r"shape \[B\] = \[4\]"),
    (dict(group_ids=torch.tensor([0.0, 0, 1, 1])), "integer tensor"),
    (dict(group_sizes=[4], mean_level="prompt"),
     "mean_level must be one of group, batch, none; got 'prompt'"),
    (dict(group_sizes=[4], std_level=None), "std_level must be one of group, batch, none; got None"),
    (dict(group_sizes=[4], mean_level="none", leave_one_out=True), "leave_one_out"),
    (dict(group_sizes=[4], eps=-1e-6), "eps must be"),
    (dict(group_sizes=[4], valid=torch.ones(3, dtype=torch.bool)), r"valid must have shape \[B\] = \[4\]"),
    (dict(group_sizes=[4], valid=torch.ones(4)), "valid must be a bool tensor"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        normalize_advantages(t64([1, 2, 3, 4]), **kwargs)


def test_non_finite_rewards_name_rows():
    r = t64([1, 2, float("nan"), 4, float("-inf")])
    with pytest.raises(ValueError, match=r"rows \[2, 4\]"):
        normalize_advantages(r, group_sizes=[5])


def test_rewards_shape_error():
    with pytest.raises(ValueError, match=r"1-D floating tensor.*\[2, 2\]"):
        normalize_advantages(torch.zeros(2, 2), group_sizes=[4])
    with pytest.raises(ValueError, match="1-D floating"):
        normalize_advantages(torch.arange(4), group_sizes=[4])


def test_group_sizes_rejected_with_several_ranks():
    with mock.patch.object(agg_dist, "world_size", lambda group=None: 2):
        with pytest.raises(ValueError, match="pass group_ids"):
            normalize_advantages(t64([1, 2]), group_sizes=[2], process_group=object())


# ----------------------------------------------------------------------------------------------
# Policies: overlong handling, group dropping, estimators, stats
# ----------------------------------------------------------------------------------------------

def step(rewards, ids, truncated=None, sample_valid=None, expected=None, **cfg):
    return compute_step_advantages(t64(rewards), torch.tensor(ids), truncated=truncated,
                                   sample_valid=sample_valid, cfg=AdvantageConfig(**cfg),
                                   expected_group_size=expected)


@pytest.mark.parametrize("policy", ["zero_advantage", "mask"])
@pytest.mark.parametrize("levels", [("group", "group"), ("group", "batch"), ("batch", "batch")])
def test_truncated_reward_does_not_leak(policy, levels):
    # Acceptance 2: changing only a truncated row's reward changes no advantage at all.
    ids = [0, 0, 0, 1, 1, 1, 2, 2]
    trunc = torch.tensor([0, 1, 0, 0, 0, 1, 0, 0]).bool()
    base = [1.0, 0.0, 3.0, 2.0, 5.0, 0.0, 1.0, 4.0]
    outs = []
    for bump in (0.0, 100.0, -1e6):
        r = list(base)
        r[1] += bump
        r[5] -= bump
        adv, mask, _ = step(r, ids, trunc, overlong_policy=policy, mean_level=levels[0], std_level=levels[1])
        outs.append((adv, mask))
    for adv, mask in outs[1:]:
        torch.testing.assert_close(adv, outs[0][0], rtol=0, atol=0)
        assert torch.equal(mask, outs[0][1])
    adv, mask = outs[0]
    assert adv[1] == 0 and adv[5] == 0
    assert mask.tolist() == [True, policy == "zero_advantage", True, True, True, policy == "zero_advantage",
                             True, True]
    # ... and the statistics are those of the remaining rows: g0 = [1, 3] (mean 2, std sqrt 2)
    if levels == ("group", "group"):
        s = math.sqrt(2) + 1e-6
        torch.testing.assert_close(adv[[0, 2]], t64([-1 / s, 1 / s]), rtol=0, atol=1e-14)


def test_keep_policy_uses_truncated_rows():
    # The control for the test above: under keep the truncated reward does move the others.
    ids, trunc = [0, 0, 0], torch.tensor([0, 1, 0]).bool()
    a, m, _ = step([1.0, 0.0, 3.0], ids, trunc, overlong_policy="keep")
    b, _, _ = step([1.0, 9.0, 3.0], ids, trunc, overlong_policy="keep")
    assert not torch.equal(a[[0, 2]], b[[0, 2]]) and a[1] != 0 and m.all()


def test_min_valid_group_size_drops_groups_everywhere():
    # groups: 0 has 3 valid rows, 1 has 2 (one failed), 2 has 1 valid (other truncated, masked)
    ids = [0, 0, 0, 1, 1, 1, 2, 2]
    r = [1.0, 2.0, 6.0, 0.0, 10.0, 7.0, 50.0, 3.0]
    ok = torch.tensor([1, 1, 1, 1, 0, 1, 1, 1]).bool()
    trunc = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1]).bool()
    adv, mask, stats = step(r, ids, trunc, ok, overlong_policy="mask", min_valid_group_size=3,
                            mean_level="batch", std_level="batch")
    # only group 0 survives: the batch statistics are those of [1, 2, 6] (mean 3, std sqrt 7)
    s = math.sqrt(7) + 1e-6
    torch.testing.assert_close(adv, t64([-2 / s, -1 / s, 3 / s, 0, 0, 0, 0, 0]), rtol=0, atol=1e-14)
    assert mask.tolist() == [True] * 3 + [False] * 5
    assert stats == {"num_groups": 3, "num_partial_groups": 2, "num_dropped_groups": 2, "num_truncated": 1,
                     "num_rows": 8, "num_stat_rows": 3}
    _, _, stats = step(r, ids, trunc, ok, overlong_policy="mask", min_valid_group_size=3, expected=4)
    assert stats["num_partial_groups"] == 3


def test_zero_advantage_keeps_truncated_rows_in_the_loss_unless_dropped():
    ids = [0, 0, 1, 1]
    trunc = torch.tensor([0, 1, 1, 1]).bool()
    adv, mask, stats = step([1.0, 2.0, 3.0, 4.0], ids, trunc, overlong_policy="zero_advantage")
    # group 0 has one stat-valid row -> advantage 0 (fewer than 2); group 1 has none -> dropped (min 1)
    assert (adv == 0).all()
    assert mask.tolist() == [True, True, False, False]
    assert stats["num_dropped_groups"] == 1 and stats["num_truncated"] == 3


@pytest.mark.parametrize("estimator, kwargs", [
    ("grpo", dict()),
    ("rloo", dict(std_level="none", leave_one_out=True)),
    ("dr_grpo", dict(std_level="none")),
])
def test_estimators_map_to_levels(estimator, kwargs):
    r = [0.3, 1.0, -2.0, 4.0, 4.5, 0.0, 0.0]
    ids = [3, 3, 3, 8, 8, 9, 9]
    adv, _, _ = step(r, ids, adv_estimator=estimator)
    torch.testing.assert_close(adv, normalize_advantages(t64(r), group_ids=torch.tensor(ids), **kwargs))
    # explicit levels override the estimator
    adv, _, _ = step(r, ids, adv_estimator=estimator, std_level="batch")
    torch.testing.assert_close(adv, normalize_advantages(t64(r), group_ids=torch.tensor(ids),
                                                         **{**kwargs, "std_level": "batch"}))


def test_policy_errors():
    with pytest.raises(ValueError, match="truncated must have shape"):
        step([1.0, 2.0], [0, 0], torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected_group_size"):
        step([1.0, 2.0], [0, 0], expected=0)
    cfg = AdvantageConfig()
    cfg.overlong_policy = "drop"
    with pytest.raises(ValueError, match="overlong_policy must be one of keep, zero_advantage, mask"):
        compute_step_advantages(t64([1, 2]), torch.tensor([0, 0]), truncated=None, cfg=cfg)


# ----------------------------------------------------------------------------------------------
# Collectives: one all-gather per call, whatever the batch
# ----------------------------------------------------------------------------------------------

def test_one_gather_per_call():
    calls = []
    real = agg_dist.all_gather_fixed

    def counting(rows, group=None):
        calls.append(rows.shape)
        return real(rows, group)

    with mock.patch.object(agg_dist, "all_gather_fixed", counting), \
            mock.patch.object(agg_dist, "all_gather_varlen", side_effect=AssertionError("unexpected")), \
            mock.patch.object(agg_dist, "all_reduce_sum", side_effect=AssertionError("unexpected")):
        for sizes in ([1], [4, 4, 3, 1], [2] * 500):
            normalize_advantages(torch.randn(sum(sizes), dtype=torch.float64), group_sizes=sizes)
        step([1.0, 2.0, 3.0], [0, 0, 1], torch.tensor([0, 0, 1]).bool(), overlong_policy="mask")
    assert len(calls) == 4 and all(shape[0] == 1 for shape in calls)   # one record, whatever the groups
    # ids out of ascending order: the record, then the gather of every bucket
    with mock.patch.object(agg_dist, "all_gather_varlen", wraps=agg_dist.all_gather_varlen) as varlen:
        normalize_advantages(torch.randn(5, dtype=torch.float64), group_ids=torch.tensor([4, 4, 1, 1, 1]))
    assert varlen.call_count == 1 and varlen.call_args[0][0].shape == (2, 10)


# ----------------------------------------------------------------------------------------------
# Property tests against the brute-force reference
# ----------------------------------------------------------------------------------------------

@st.composite
def batches(draw, max_rows=14):
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=6))
    n = sum(sizes)
    # small integer-ish rewards make ties (zero-spread groups) frequent; floats cover the rest
    rewards = draw(st.lists(st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5]),
                                      st.floats(-10, 10).map(lambda x: round(x, 6))), min_size=n, max_size=n))
    valid = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    mean_level = draw(st.sampled_from(LEVELS))
    std_level = draw(st.sampled_from(LEVELS))
    loo = draw(st.booleans()) and mean_level != "none"
    unbiased = draw(st.booleans())
    eps = draw(st.sampled_from([0.0, 1e-6, 1e-2]))
    return sizes, rewards, valid, mean_level, std_level, loo, unbiased, eps


def _close(actual, expected):
    torch.testing.assert_close(actual, t64(expected), rtol=1e-9, atol=1e-9)


@settings(max_examples=400, deadline=None)
@given(batch=batches())
def test_matches_brute_force(batch):
    sizes, rewards, valid, mean_level, std_level, loo, unbiased, eps = batch
    group_of_row = ids_from_sizes(sizes).tolist()
    adv = normalize_advantages(t64(rewards), group_sizes=sizes, valid=torch.tensor(valid),
                               mean_level=mean_level, std_level=std_level, eps=eps, unbiased=unbiased,
                               leave_one_out=loo)
    _close(adv, reference(rewards, group_of_row, valid, mean_level, std_level, eps, unbiased, loo))


@settings(max_examples=150, deadline=None)
@given(batch=batches(), seed=st.integers(0, 2**31 - 1))
def test_offset_does_not_change_advantages(batch, seed):
    sizes, _, valid, mean_level, std_level, loo, unbiased, eps = batch
    noise = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # Round the noise to multiples of 2^-26 so that noise + 1e6 is exact (20 + 26 bits < 53): any
    # difference left is the algorithm's, not the input's rounding (which alone is ~1e-10 absolute).
    noise = torch.round(noise * 2**26) / 2**26
    kw = dict(group_sizes=sizes, valid=torch.tensor(valid), mean_level=mean_level, std_level=std_level,
              eps=eps, unbiased=unbiased, leave_one_out=loo)
    if mean_level == "none" and std_level != "none":
        return  # r / std is not offset-invariant by definition
    a = normalize_advantages(noise, **kw)
    b = normalize_advantages(noise + 1e6, **kw) - (1e6 if mean_level == std_level == "none" else 0.0) \
        * torch.tensor(valid, dtype=torch.float64)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-12)


def simulate_ranks(splits, fn, log=None):
    """Run ``fn(rank)`` for each simulated DP rank through the real code path, collective by collective:
    pass ``k`` replays the results of the first ``k`` collectives and records what every rank hands to
    collective ``k + 1``; once every rank has recorded it, its result (concatenation for the gathers,
    sum / max for the all-reduces) is known. Every rank must issue the same sequence of collectives;
    ``log`` (a list) receives ``(wrapper name, shape of rank 0's input)`` of each."""
    world = len(splits)
    results = []          # results[k]: the outcome of collective k (the same on every rank)

    class Recorded(Exception):
        pass

    def run(rank, inputs):
        calls = iter(range(1_000_000))

        def collective(combine, name):
            def call(t, group=None):
                k = next(calls)
                if k < len(results):
                    return results[k]
                inputs[rank] = (combine, t, name)
                raise Recorded
            return call

        with mock.patch.object(agg_dist, "world_size", lambda group=None: world), \
                mock.patch.object(agg_dist, "rank", lambda group=None: rank), \
                mock.patch.object(agg_dist, "all_gather_varlen",
                                  collective(torch.cat, "all_gather_varlen")), \
                mock.patch.object(agg_dist, "all_gather_fixed", collective(torch.cat, "all_gather_fixed")), \
                mock.patch.object(agg_dist, "all_reduce_sum",
                                  collective(lambda ts: torch.stack(ts).sum(0), "all_reduce_sum")), \
                mock.patch.object(agg_dist, "all_reduce_max",
                                  collective(lambda ts: torch.stack(ts).amax(0), "all_reduce_max")):
            return fn(rank)

    while True:
        inputs = [None] * world
        outs = []
        for r in range(world):
            try:
                outs.append(run(r, inputs))
            except Recorded:
                pass
        if len(outs) == world:
            return outs
        assert all(i is not None for i in inputs), "ranks issued different collectives"
        assert len({name for _, _, name in inputs}) == 1, "ranks issued different collectives"
        combine, _, name = inputs[0]
        results.append(combine([t for _, t, _ in inputs]))
        if log is not None:
            log.append((name, tuple(inputs[0][1].shape)))


@st.composite
def split_batches(draw):
    batch = draw(batches())
    n = sum(batch[0])
    k = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=k - 1, max_size=k - 1)))
    return batch, [0] + cuts + [n]


@settings(max_examples=200, deadline=None)
@given(data=split_batches())
def test_split_over_ranks_matches_brute_force(data):
    (sizes, rewards, valid, mean_level, std_level, loo, unbiased, eps), bounds = data
    ids = ids_from_sizes(sizes, stride=3, offset=11)
    r, v = t64(rewards), torch.tensor(valid)
    pieces = list(zip(bounds, bounds[1:]))

    def per_rank(rank):
        a, b = pieces[rank]
        return normalize_advantages(r[a:b], group_ids=ids[a:b], valid=v[a:b], mean_level=mean_level,
                                    std_level=std_level, eps=eps, unbiased=unbiased, leave_one_out=loo,
                                    process_group=object())

    adv = torch.cat(simulate_ranks(pieces, per_rank))
    _close(adv, reference(rewards, ids.tolist(), valid, mean_level, std_level, eps, unbiased, loo))


@settings(max_examples=150, deadline=None)
@given(data=split_batches(), trunc_bits=st.integers(0, 2**30), policy=st.sampled_from(
    ["keep", "zero_advantage", "mask"]), min_valid=st.integers(1, 4), est=st.sampled_from(
    ["grpo", "rloo", "dr_grpo"]))
def test_policy_split_over_ranks_matches_brute_force(data, trunc_bits, policy, min_valid, est):
    (sizes, rewards, valid, _, _, _, _, _), bounds = data
    n = len(rewards)
    ids = ids_from_sizes(sizes, stride=2)
    trunc = [bool(trunc_bits >> i & 1) for i in range(n)]
    cfg = AdvantageConfig(adv_estimator=est, overlong_policy=policy, min_valid_group_size=min_valid)
    pieces = list(zip(bounds, bounds[1:]))

    def per_rank(rank):
        a, b = pieces[rank]
        return compute_step_advantages(t64(rewards[a:b]), ids[a:b],
                                       truncated=torch.tensor(trunc[a:b], dtype=torch.bool),
                                       sample_valid=torch.tensor(valid[a:b], dtype=torch.bool), cfg=cfg,
                                       process_group=object())

    outs = simulate_ranks(pieces, per_rank)
    adv = torch.cat([o[0] for o in outs])
    mask = torch.cat([o[1] for o in outs])
    # brute force: stat-valid rows, groups counted over the whole batch
    group_of_row = ids.tolist()
    stat_valid = [valid[i] and (policy == "keep" or not trunc[i]) for i in range(n)]
    count = {}
    for i in range(n):
        count[group_of_row[i]] = count.get(group_of_row[i], 0) + stat_valid[i]
    dropped = {g for g, c in count.items() if c < min_valid}
    _close(adv, reference(rewards, group_of_row, stat_valid, cfg.mean_level, cfg.std_level, cfg.eps,
                          cfg.unbiased_std, cfg.leave_one_out, dropped))
    want_mask = [valid[i] and group_of_row[i] not in dropped and not (policy == "mask" and trunc[i])
                 for i in range(n)]
    assert mask.tolist() == want_mask
    usable = {}
    for i in range(n):
        usable[group_of_row[i]] = usable.get(group_of_row[i], 0) + valid[i]
    largest = max(usable.values())
    want_stats = {"num_groups": len(sizes), "num_partial_groups": sum(u < largest for u in usable.values()),
                  "num_dropped_groups": len(dropped), "num_truncated": sum(trunc), "num_rows": n,
                  "num_stat_rows": sum(stat_valid[i] for i in range(n) if group_of_row[i] not in dropped)}
    for _, _, stats in outs:
        assert stats == want_stats


# A group of 6 rows over four ranks (2 rows | none | 1 row | 3 rows and the next group), a rank with no
# rows, a rank holding one group only, and a rank starting and ending inside groups.
SPAN_SIZES = [2, 6, 3, 1, 4]
SPAN_BOUNDS = [0, 1, 4, 4, 5, 11, 11, 16]


@pytest.mark.parametrize("order", ["ascending", "descending"])
@pytest.mark.parametrize("levels", [("group", "group", False), ("batch", "batch", False),
                                    ("group", "batch", True), ("none", "group", False)])
def test_group_spanning_many_ranks(order, levels):
    """Ascending ids take the boundary exchange (ONE fixed-size all-gather); descending ids the full
    gather of every bucket. Both equal the brute-force reference and give the same step statistics."""
    mean_level, std_level, loo = levels
    g = torch.Generator().manual_seed(3)
    n = sum(SPAN_SIZES)
    rewards = torch.randint(0, 4, (n,), generator=g).double()
    rewards += 0.25 * torch.randn(n, generator=g, dtype=torch.float64)
    valid = torch.rand(n, generator=g) > 0.15
    truncated = torch.rand(n, generator=g) > 0.7
    ids = ids_from_sizes(SPAN_SIZES, stride=5, offset=2)
    if order == "descending":
        ids = 100 - ids
    pieces = list(zip(SPAN_BOUNDS, SPAN_BOUNDS[1:]))
    cfg = AdvantageConfig(mean_level=mean_level, std_level=std_level, leave_one_out=loo,
                          overlong_policy="zero_advantage", min_valid_group_size=2)

    def per_rank(rank):
        a, b = pieces[rank]
        return compute_step_advantages(rewards[a:b], ids[a:b], truncated=truncated[a:b],
                                       sample_valid=valid[a:b], cfg=cfg, process_group=object())

    log = []
    outs = simulate_ranks(pieces, per_rank, log)
    names = [name for name, _ in log]
    full = ["all_gather_fixed", "all_gather_varlen"]
    assert names == (["all_gather_fixed"] if order == "ascending" else full)
    whole = compute_step_advantages(rewards, ids, truncated=truncated, sample_valid=valid, cfg=cfg)
    torch.testing.assert_close(torch.cat([o[0] for o in outs]), whole[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.cat([o[1] for o in outs]), whole[1])
    for o in outs:
        assert o[2] == whole[2]
    stat_valid = (valid & ~truncated).tolist()
    count = {}
    for gid, v in zip(ids.tolist(), stat_valid):
        count[gid] = count.get(gid, 0) + v
    dropped = {gid for gid, c in count.items() if c < 2}
    _close(torch.cat([o[0] for o in outs]), reference(rewards.tolist(), ids.tolist(), stat_valid, mean_level,
                                                      std_level, cfg.eps, True, loo, dropped))


def test_boundary_exchange_payload_does_not_grow_with_groups():
    """The boundary record is a fixed number of int64 per rank, whatever the number of groups."""
    from megatron_rl_agg.parallel.advantages import boundary_record_width

    assert boundary_record_width(batch_level=False, expected_group_size_known=False) == 19
    assert boundary_record_width(batch_level=True, expected_group_size_known=True) == 22
    for sizes in ([3] * 4, [3] * 400):
        ids = ids_from_sizes(sizes)
        n = ids.numel()
        pieces = [(0, n // 3 + 1), (n // 3 + 1, n // 3 + 1), (n // 3 + 1, n)]
        for kwargs, width in ((dict(), 19), (dict(std_level="batch"), 23)):
            def per_rank(rank):
                a, b = pieces[rank]
                return normalize_advantages(torch.arange(a, b, dtype=torch.float64), group_ids=ids[a:b],
                                            process_group=object(), **kwargs)

            log = []
            simulate_ranks(pieces, per_rank, log)
            assert log == [("all_gather_fixed", (1, width))]
