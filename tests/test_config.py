"""Config dataclasses and the argparse flags built from them."""

import argparse

import pytest

from megatron_rl_agg.core.config import (
    AdvantageConfig,
    LossConfig,
    TERM_AGGREGATIONS,
    add_loss_aggregation_args,
)


def parse(*argv):
    return add_loss_aggregation_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_defaults_round_trip():
    args = parse()
    assert LossConfig.from_args(args) == LossConfig()
    assert AdvantageConfig.from_args(args) == AdvantageConfig()


def test_every_issue_flag_exists():
    args = parse("--loss-aggregation", "seq-mean-token-sum-norm", "--max-response-length", "64",
                 "--kl-coef", "0.1", "--kl-estimator", "k2", "--entropy-coef", "0.01",
                 "--kl-aggregation", "token-mean", "--entropy-aggregation", "seq_mean",
                 "--clip-eps-low", "0.2", "--clip-eps-high", "0.28", "--dual-clip-c", "3",
                 "--adv-estimator", "rloo", "--overlong-policy", "mask", "--min-valid-group-size", "2")
    cfg = LossConfig.from_args(args)
    assert cfg.loss_aggregation == "seq_mean_token_sum_norm"        # alias resolved
    assert cfg.kl_aggregation == "token_mean" and cfg.entropy_aggregation == "seq_mean_token_mean"
    assert (cfg.max_response_length, cfg.kl_coef, cfg.kl_estimator, cfg.dual_clip_c) == (64, 0.1, "k2", 3.0)
    adv = AdvantageConfig.from_args(args)
    assert (adv.mean_level, adv.std_level, adv.leave_one_out) == ("group", "none", True)
    assert (adv.overlong_policy, adv.min_valid_group_size) == ("mask", 2)


def test_estimator_defaults_and_overrides():
    assert (AdvantageConfig().mean_level, AdvantageConfig().std_level) == ("group", "group")
    dr = AdvantageConfig(adv_estimator="dr_grpo")
    assert (dr.mean_level, dr.std_level, dr.leave_one_out) == ("group", "none", False)
    lite = AdvantageConfig.from_args(parse("--adv-std-level", "batch"))   # LitePPO: group mean, batch std
    assert (lite.mean_level, lite.std_level) == ("group", "batch")


def test_bad_mode_flag_names_value_and_choices(capsys):
    with pytest.raises(SystemExit):
        parse("--loss-aggregation", "tokenmean")
    err = capsys.readouterr().err
    assert "'tokenmean'" in err and "token_mean_legacy" in err and "seq-mean-token-sum-norm" in err


def test_dr_grpo_needs_horizon():
    with pytest.raises(ValueError, match="max_response_length"):
        LossConfig(loss_aggregation="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="entropy_aggregation.*max_response_length"):
        LossConfig(entropy_aggregation="dr_grpo")


@pytest.mark.parametrize("kwargs,match", [
    (dict(kl_estimator="k4"), "kl_estimator must be one of k1, k2, k3; got 'k4'"),
    (dict(kl_aggregation="token_mean_legacy"), "kl_aggregation must be one of microbatch_mean"),
    (dict(entropy_aggregation="nope"), "entropy_aggregation must be one of"),
    (dict(dual_clip_c=0.5), r"dual_clip_c \(--dual-clip-c\) must be > 1"),
    (dict(clip_eps_low=-0.1), r"clip_eps_low \(--clip-eps-low\) must be >= 0"),
    (dict(max_response_length=0), "max_response_length must be a positive int, got 0"),
])
def test_loss_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(adv_estimator="ppo"), "adv_estimator must be one of grpo, rloo, dr_grpo; got 'ppo'"),
    (dict(mean_level="prompt"), "mean_level must be one of group, batch, none"),
    (dict(overlong_policy="drop"), "overlong_policy must be one of keep, zero_advantage, mask"),
    (dict(min_valid_group_size=0), "min_valid_group_size must be an int >= 1, got 0"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(mean_level="batch", leave_one_out=True), "leave_one_out needs mean_level='group'"),
])
def test_advantage_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdvantageConfig(**kwargs)


def test_term_aggregations_exclude_legacy():
    assert "token_mean_legacy" not in TERM_AGGREGATIONS and TERM_AGGREGATIONS[0] == "microbatch_mean"
