"""Trainer command line: YAML defaults, CLI precedence, clear errors for bad combinations."""

from pathlib import Path

import pytest

from megatron_rl_agg.trainer.cli.arguments import parse_args, virtual_pipeline_size
from megatron_rl_agg.trainer.cli.validation import TrainerArgsError

REPO = Path(__file__).resolve().parents[2]


def test_yaml_then_cli_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("global-batch-size: 32\nlr: 0.01\nloss_aggregation: prompt-mean\n")
    args = parse_args(["--config", str(cfg), "--lr", "0.5"])
    assert args.global_batch_size == 32           # from the file (dashed key)
    assert args.loss_aggregation == "prompt_mean"  # alias resolved by the plugin's flag type
    assert args.lr == 0.5                          # the command line wins


def test_unknown_yaml_key_lists_valid_ones(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("global-batchsize: 32\n")
    expected = r"unknown option\(s\) \['global-batchsize'\]; valid: .*global-batch-size"
    with pytest.raises(TrainerArgsError, match=expected):
        parse_args(["--config", str(cfg)])


def test_yaml_choice_is_checked(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("overlong-policy: drop\n")
    with pytest.raises(TrainerArgsError, match="c.yaml: overlong-policy='drop' is not one of"):
        parse_args(["--config", str(cfg)])


@pytest.mark.parametrize("argv, message", [
    (["--global-batch-size", "30", "--num-samples-per-prompt", "8"],
     "multiple of --num-samples-per-prompt 8"),
    (["--rollout-failure-prob", "1.0"], r"--rollout-failure-prob must be in \[0, 1\)"),
    (["--vocab-size", "33", "--tensor-model-parallel-size", "2"], "--vocab-size 33 must be a multiple"),
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], "--num-layers 3 must be a multiple"),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2",
      "--num-layers-per-virtual-pipeline-stage", "2"],
     "at least 2 virtual stages"),
    (["--ref-load", "x"], "--ref-load is only used with --kl-coef > 0"),
    (["--rollouts", "f.jsonl", "--loss-aggregation", "dr_grpo"], "--max-response-length"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be a positive integer"),
    (["--context-parallel-size", "2", "--seq-length", "18"],
     r"--seq-length 18 must be a multiple of 2 x --context-parallel-size = 4 .*--seq-length 20"),
    (["--context-parallel-size", "2", "--sequence-packing"],
     "--sequence-packing is not supported with --context-parallel-size > 1"),
    (["--calculate-per-token-loss", "--ddp-average-in-collective"],
     "--calculate-per-token-loss cannot be combined with --ddp-average-in-collective"),
    (["--context-parallel-size", "0"], "--context-parallel-size must be a positive integer"),
    (["--recompute-logprobs"], "--recompute-logprobs needs --rollouts with 'logprobs'"),
    (["--rollouts", "f.jsonl", "--is-level", "token"], "--is-level token needs --recompute-logprobs"),
    (["--rollouts", "f.jsonl", "--recompute-logprobs", "--is-level", "token", "--is-low", "3"],
     "--is-low=3.0 is above --is-high=2.0"),
    (["--rollouts", "f.jsonl", "--recompute-logprobs", "--is-level", "token", "--is-mode", "mask",
      "--is-low", "0.5", "--is-veto", "0.7"], "--is-veto=0.7 is above the lower bound --is-low=0.5"),
])
def test_bad_combinations(argv, message):
    with pytest.raises(TrainerArgsError, match=message):
        parse_args(argv)


def test_on_policy_horizon_defaults_to_generation_limit():
    args = parse_args(["--loss-aggregation", "seq_mean_token_sum_norm", "--max-new-tokens", "6"])
    assert args.max_response_length == 6


def test_virtual_pipeline_size():
    args = parse_args(["--num-layers", "8", "--pipeline-model-parallel-size", "2",
                       "--num-layers-per-virtual-pipeline-stage", "2"])
    assert virtual_pipeline_size(args) == 2


@pytest.mark.parametrize("name", ["cpu_demo", "dapo", "grpo", "dr_grpo", "minimax_m1"])
def test_shipped_configs_parse(name):
    args = parse_args(["--config", str(REPO / "configs" / f"{name}.yaml")])
    assert args.global_batch_size % args.num_samples_per_prompt == 0


MOE = ["--num-experts", "4", "--disable-bias-linear"]


@pytest.mark.parametrize("argv, message", [
    (MOE + ["--expert-model-parallel-size", "3"], "--num-experts 4 is not divisible by --expert-model-parallel-size 3"),
    (MOE + ["--moe-router-topk", "5"], "--moe-router-topk 5 must be between 1 and --num-experts 4"),
    (["--expert-model-parallel-size", "2"], "--expert-model-parallel-size 2 needs an MoE model"),
    (["--num-experts", "4"], "add --disable-bias-linear"),
    (MOE + ["--sequence-packing"], "--sequence-packing with --num-experts is not supported"),
    (MOE + ["--moe-aux-loss-coeff", "-1"], "--moe-aux-loss-coeff must be >= 0"),
    (MOE + ["--expert-model-parallel-size", "0"], "--expert-model-parallel-size must be a positive integer"),
    (MOE + ["--tensor-model-parallel-size", "2", "--seq-length", "15"], "MoE layers at TP > 1 run sequence parallel"),
    (MOE + ["--context-parallel-size", "2"], "--num-experts with --context-parallel-size > 1 is not supported"),
    (["--moe-routing-replay", "r2"], "--moe-routing-replay r2 needs --num-experts"),
    (MOE + ["--moe-routing-replay", "r3"], "--moe-routing-replay r3 replays the routes of an offline --rollouts file"),
])
def test_bad_moe_combinations(argv, message):
    with pytest.raises(TrainerArgsError, match=message):
        parse_args(argv)


def test_routing_replay_flag(capsys):
    assert parse_args(MOE + ["--moe-routing-replay", "r2"]).moe_routing_replay == "r2"
    assert parse_args(MOE).moe_routing_replay == "off"
    with pytest.raises(SystemExit):
        parse_args(MOE + ["--moe-routing-replay", "r4"])
    err = capsys.readouterr().err
    assert "invalid choice: 'r4'" in err and "'off', 'r2', 'r3'" in err


def test_unknown_dispatcher_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        parse_args(MOE + ["--moe-token-dispatcher-type", "flex"])
    err = capsys.readouterr().err
    assert "--moe-token-dispatcher-type: invalid choice: 'flex'" in err
    assert "alltoall" in err and "allgather" in err


@pytest.mark.parametrize("world, argv, message", [
    (4, ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "4"],
     r"--expert-model-parallel-size 4 must divide DP x CP = 2 \(DP = world 4 / \(TP 2 x PP 1 x CP 1\)\)"),
    (6, ["--pipeline-model-parallel-size", "4"], "world size 6 is not a multiple of TP x PP x CP = 1 x 4 x 1"),
])
def test_world_size_rules(world, argv, message):
    from megatron_rl_agg.trainer.cli.arguments import check_world

    args = parse_args(MOE + argv + ["--num-layers", "4"])
    with pytest.raises(TrainerArgsError, match=message):
        check_world(args, world)
    check_world(parse_args(MOE + ["--expert-model-parallel-size", "2"]), 2)    # DP2 = EP2: fits


def test_recompute_logprobs_refuses_a_file_without_logprobs(tmp_path):
    import json

    from megatron_rl_agg.trainer.loop.build import _build_source

    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt_id": "a", "prompt": [1, 2], "response": [3], "reward": 1.0,
                                "finish_reason": "stop"}) + "\n")
    args = parse_args(["--rollouts", str(path), "--recompute-logprobs", "--global-batch-size", "1"])
    with pytest.raises(TrainerArgsError, match="--recompute-logprobs: .*r.jsonl has no 'logprobs'"):
        _build_source(args)
    path.write_text(json.dumps({"prompt_id": "a", "prompt": [1, 2], "response": [3], "reward": 1.0,
                                "finish_reason": "stop", "logprobs": [-0.5]}) + "\n")
    assert _build_source(args).has_logprobs
