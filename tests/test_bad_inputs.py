"""Bad inputs, one table row each: the API, rollout files, YAML configs, flags, checkpoints, the audit.

Every row calls the real entry point with one bad value and asserts the error type and that the message
names the value (and, where there are few, what is accepted). Rows marked SAFE assert the documented safe
behaviour instead of an error. All single-process and cheap; the multi-process faults (signals, killed
and stopped ranks, real damaged checkpoints) are in tests/trainer/test_reliability_dist.py.
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

from megatron_rl_agg.core.aggregation import aggregate
from megatron_rl_agg.parallel.weights import token_weights
from megatron_rl_agg.parallel.advantages import normalize_advantages
from megatron_rl_agg.core.config import AdvantageConfig, LossConfig
from megatron_rl_agg.trainer.loop import checkpoint, safety
from megatron_rl_agg.trainer.rollout import rollouts
from megatron_rl_agg.trainer.cli import validation
from megatron_rl_agg.trainer.cli.arguments import parse_args
from megatron_rl_agg.trainer.cli.validation import TrainerArgsError
from megatron_rl_agg.trainer.loop.checkpoint import CheckpointError
from megatron_rl_agg.trainer.rollout.rollouts import RolloutFormatError

MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


def _mask(value):
    m = MASK.float().clone()
    m[0, 2] = value
    return m


# ------------------------------------------------------------------------------------------------
# API
# ------------------------------------------------------------------------------------------------

def _prepared(cfg):
    from megatron_rl_agg.mcore.batch import prepare_microbatches

    batch = {"tokens": torch.zeros(2, 3, dtype=torch.long), "labels": torch.zeros(2, 3, dtype=torch.long),
             "loss_mask": MASK.float(), "advantages": torch.ones(2)}
    return prepare_microbatches(batch, cfg, 1)


def _other_config():
    from megatron_rl_agg.mcore.loss import make_loss_func

    mb = _prepared(LossConfig(loss_aggregation="token_mean"))[0]
    make_loss_func(mb, None, LossConfig(loss_aggregation="seq_mean_token_mean"))


def _prepare_soft_mask():
    from megatron_rl_agg.mcore.batch import prepare_microbatches

    batch = {"tokens": torch.zeros(2, 3, dtype=torch.long), "labels": torch.zeros(2, 3, dtype=torch.long),
             "loss_mask": _mask(0.5), "advantages": torch.ones(2)}
    prepare_microbatches(batch, LossConfig(), 1)


API = [
    ("mask 0.5", lambda: token_weights(_mask(0.5), "token_mean"), ValueError, r"only 0 and 1.*found 0\.5"),
    ("mask 2", lambda: aggregate(VALUES, _mask(2.0), "token_mean"), ValueError, r"found 2\.0"),
    ("mask -1", lambda: token_weights(_mask(-1.0), "seq_mean_token_mean"), ValueError, r"found -1\.0"),
    ("mask NaN", lambda: token_weights(_mask(math.nan), "token_mean"), ValueError, r"found nan"),
    ("mask as list", lambda: token_weights([[1, 0]], "token_mean"), TypeError,
     r"loss_mask must be a torch.Tensor.*list"),
    ("mask 3-D", lambda: token_weights(MASK[None], "token_mean"), ValueError,
     r"\[B, T\], got shape \(1, 2, 3\)"),
    ("prepare soft mask", _prepare_soft_mask, ValueError, r"found 0\.5"),
    ("group ids as list", lambda: token_weights(MASK, "prompt_mean", group_ids=[0, 1]), TypeError,
     r"group_ids must be a torch.Tensor.*got list.*torch.as_tensor"),
    ("group ids float", lambda: token_weights(MASK, "prompt_mean", group_ids=torch.tensor([0.0, 1.0])),
     TypeError, r"group_ids dtype torch.float32 is not supported; accepted: torch.int64, torch.int32"),
    ("group ids bool", lambda: token_weights(MASK, "prompt_mean", group_ids=torch.tensor([True, False])),
     TypeError, r"torch.bool is not supported"),
    ("mode int", lambda: token_weights(MASK, 5), TypeError,
     r"mode is a str, got 5 \(int\); valid names: token_mean"),
    ("mode None", lambda: aggregate(VALUES, MASK, None), TypeError, r"got None \(NoneType\)"),
    ("mode unknown", lambda: aggregate(VALUES, MASK, "token_avg"), ValueError, r"'token_avg'; valid names"),
    ("values/mask shapes", lambda: aggregate(VALUES[:, :2], MASK, "token_mean"), ValueError,
     r"values \(2, 2\) and loss_mask \(2, 3\) differ"),
    ("values int", lambda: aggregate(VALUES.long(), MASK, "token_mean"), TypeError,
     r"floating-point.*torch.int64"),
    ("kl_coef nan", lambda: LossConfig(kl_coef=math.nan), ValueError,
     r"kl_coef must be a finite number, got nan"),
    ("entropy_coef inf", lambda: LossConfig(entropy_coef=math.inf), ValueError, r"entropy_coef .* got inf"),
    ("clip_eps_low nan", lambda: LossConfig(clip_eps_low=math.nan), ValueError, r"clip_eps_low .* got nan"),
    ("clip_eps_high str", lambda: LossConfig(clip_eps_high="0.2"), ValueError,
     r"clip_eps_high .*'0.2' \(str\)"),
    ("dual_clip_c nan", lambda: LossConfig(dual_clip_c=math.nan), ValueError, r"dual_clip_c .* got nan"),
    ("adv eps nan", lambda: AdvantageConfig(eps=math.nan), ValueError,
     r"eps must be a finite number, got nan"),
    ("adv eps inf", lambda: AdvantageConfig(eps=math.inf), ValueError, r"eps .* got inf"),
    ("config of another objective", _other_config, ValueError,
     r"prepared for another loss config.*"
     r"loss_aggregation='token_mean' \(prepared\) vs 'seq_mean_token_mean'"),
    ("reward 1e200", lambda: normalize_advantages(torch.tensor([1e200, 0.0, 1.0], dtype=torch.float64),
                                                  group_sizes=[3]),
     ValueError, r"\|r\| <= 1e\+150.*rows \[0\]"),
    ("reward nan", lambda: normalize_advantages(torch.tensor([math.nan, 0.0], dtype=torch.float64),
                                                group_sizes=[2]), ValueError, r"must be finite"),
]


@pytest.mark.parametrize("name, call, error, match", API, ids=[row[0] for row in API])
def test_api_refuses(name, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_safe_fp16_counts_do_not_overflow():
    """SAFE: an fp16 token mean over 70000 tokens (more than fp16's 65504) is exact, not inf / NaN."""
    values = torch.full((1, 70000), 0.5, dtype=torch.float16)
    mask = torch.ones(1, 70000)
    for mode in ("token_mean", "seq_mean_token_mean", "prompt_mean"):
        got = aggregate(values, mask, mode, group_sizes=[1])
        assert got.dtype == torch.float16 and got.item() == 0.5, mode


def test_safe_large_rewards_normalize_like_small_ones():
    """SAFE: advantages are scale-free up to 1e150: the same rewards scaled by 1e148 give the same
    advantages."""
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, -1.0, 0.5], dtype=torch.float64)
    small = normalize_advantages(r, group_sizes=[4, 2], eps=0.0)
    large = normalize_advantages(r * 1e148, group_sizes=[4, 2], eps=0.0)
    torch.testing.assert_close(large, small, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------
# rollout files
# ------------------------------------------------------------------------------------------------

def _row(pid="a", prompt=(1, 2), response=(3, 4), reward=1.0, finish="stop", **extra):
    return {"prompt_id": pid, "prompt": list(prompt), "response": list(response), "reward": reward,
            "finish_reason": finish, **extra}


def _file(tmp_path, *lines):
    path = tmp_path / "r.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def _long_row_late(tmp_path):
    rows = [_row(f"g{i}", response=(3,) * 4) for i in range(6)] + [_row("late", response=(3,) * 40)]
    path = _file(tmp_path, *rows)
    validation.check_rollout_rows(rollouts.read_rollouts(path, vocab_size=32), 16, path)


ROLLOUTS = [
    ("logprob -200", lambda p: rollouts.read_rollouts(_file(p, _row(), _row(logprobs=[-200.0, -1.0]))),
     RolloutFormatError, r"r.jsonl:2: 'logprobs'\[0\] = -200.0 is below -88.0.*overflow float32"),
    ("logprob positive", lambda p: rollouts.read_rollouts(_file(p, _row(logprobs=[0.5, -1.0]))),
     RolloutFormatError, r"r.jsonl:1: 'logprobs' must be a list of finite numbers <= 0"),
    ("logprob count", lambda p: rollouts.read_rollouts(_file(p, _row(logprobs=[-1.0]))),
     RolloutFormatError, r"1 entries for 2 response tokens"),
    ("reward NaN", lambda p: rollouts.read_rollouts(_file(
        p, '{"prompt_id": "a", "prompt": [1], "response": [], "reward": NaN, "finish_reason": "stop"}')),
     RolloutFormatError, r"r.jsonl:1: 'reward' must be a finite number, got nan"),
    ("reward as text", lambda p: rollouts.read_rollouts(_file(p, _row(reward="1.0"))),
     RolloutFormatError, r"'reward' must be a finite number, got '1.0'"),
    ("finish reason", lambda p: rollouts.read_rollouts(_file(p, _row(finish="eos"))),
     RolloutFormatError, r"'finish_reason' must be one of \('stop', 'length'\), got 'eos'"),
    ("token out of vocab", lambda p: rollouts.read_rollouts(_file(p, _row(response=(3, 40))), vocab_size=32),
     RolloutFormatError, r"outside \[0, 32\): \[40\]"),
    ("group reappears", lambda p: rollouts.read_rollouts(_file(p, _row("a"), _row("b"), _row("a"))),
     RolloutFormatError, r"r.jsonl:3: prompt_id 'a' reappears after another group"),
    ("bad JSON", lambda p: rollouts.read_rollouts(_file(p, _row(), "{not json")),
     RolloutFormatError, r"r.jsonl:2: invalid JSON"),
    ("empty file", lambda p: rollouts.read_rollouts(_file(p)), RolloutFormatError, r"no samples"),
    ("over-long row in a later mini-batch", _long_row_late, TrainerArgsError,
     r"r.jsonl:7: prompt \+ response = 42 tokens exceed --seq-length 16 \+ 1"),
]


@pytest.mark.parametrize("name, call, error, match", ROLLOUTS, ids=[row[0] for row in ROLLOUTS])
def test_rollout_file_refused(tmp_path, name, call, error, match):
    with pytest.raises(error, match=match):
        call(tmp_path)


# ------------------------------------------------------------------------------------------------
# YAML configs and flags
# ------------------------------------------------------------------------------------------------

YAML = [   # errors name the key as the file writes it (hyphens or underscores)
    ("quoted false for a flag", 'no-progress-bar: "false"',
     r"c.yaml: no-progress-bar='false' \(str\) for a boolean option"),
    ("quoted true for a flag", 'use_distributed_optimizer: "true"',
     r"c.yaml: use_distributed_optimizer='true' \(str\)"),
    ("key with hyphens named as written", 'use-distributed-optimizer: "true"',
     r"c.yaml: use-distributed-optimizer='true' \(str\) for a boolean option"),
    ("text for a --no- pair", 'save-on-interrupt: "no"',
     r"c.yaml: save-on-interrupt='no' \(str\) for a boolean option"),
    ("float for an int", "micro-batch-size: 4.0", r"c.yaml: micro-batch-size=4.0 \(float\) for an integer option"),
    ("bool for an int", "train-iters: true", r"c.yaml: train-iters=True \(bool\) for an integer option"),
    ("nan for a float", "lr: .nan", r"--lr must be a finite number, got nan"),
    ("list for a float", "kl-coef: [0.1]", r"c.yaml: kl-coef=\[0.1\] \(list\) for a number option"),
    ("number for a path", "save: 5", r"c.yaml: save=5 \(int\) for a text option"),
    ("number for a mode", "loss-aggregation: 3", r"c.yaml: loss-aggregation=3 \(int\) for a text option"),
    ("unknown mode", "loss-aggregation: token_avg",
     r"c.yaml: loss-aggregation='token_avg': unknown loss aggregation"),
    ("null for a number", "lr: null", r"c.yaml: lr=None: the option needs a value"),
    ("unknown key", "micro-batch: 4", r"unknown option\(s\) \['micro-batch'\]; valid: .*micro-batch-size"),
]


@pytest.mark.parametrize("name, text, match", YAML, ids=[row[0] for row in YAML])
def test_yaml_value_refused(tmp_path, name, text, match):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text + "\n")
    with pytest.raises(TrainerArgsError, match=match):
        parse_args(["--config", str(cfg)])


def test_safe_yaml_numbers_as_text_are_read_as_numbers(tmp_path):
    """SAFE: YAML reads 1e-3 (no dot) as a string; a float option converts it like the command line."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nkl-coef: 0\nno-progress-bar: true\n")
    args = parse_args(["--config", str(cfg)])
    assert args.lr == 1e-3 and args.kl_coef == 0.0 and args.no_progress_bar is True


FLAGS = [
    (["--kl-coef", "nan"], r"--kl-coef must be a finite number, got nan"),
    (["--clip-eps-low", "nan"], r"--clip-eps-low must be a finite number, got nan"),
    (["--entropy-coef", "inf"], r"--entropy-coef must be a finite number, got inf"),
    (["--temperature", "nan"], r"--temperature must be a finite number, got nan"),
    (["--dual-clip-c", "nan"], r"--dual-clip-c must be a finite number"),
    (["--adv-eps", "nan"], r"eps must be a finite number"),
    (["--lr", "-1"], r"--lr must be in \[0, inf\), got -1.0"),
    (["--adam-beta1", "1.0"], r"--adam-beta1 must be in \[0, 1\), got 1.0"),
    (["--adam-eps", "0"], r"--adam-eps must be in \(0, inf\)"),
    (["--clip-grad", "nan"], r"--clip-grad must be a finite number"),
    (["--rollout-failure-prob", "nan"], r"--rollout-failure-prob must be a finite number"),
    (["--distributed-timeout-minutes", "0"], r"--distributed-timeout-minutes must be in \(0, inf\)"),
    (["--hidden-size", "30"], r"--hidden-size 30 must be a multiple of --num-attention-heads 4"),
    (["--num-attention-heads", "3", "--hidden-size", "48", "--tensor-model-parallel-size", "2"],
     r"--num-attention-heads 3 must be a multiple of --tensor-model-parallel-size 2"),
    (["--ffn-hidden-size", "0"], r"--ffn-hidden-size must be a positive integer"),
    (["--ffn-hidden-size", "33", "--tensor-model-parallel-size", "2"],
     r"--ffn-hidden-size 33 must be a multiple of --tensor-model-parallel-size 2"),
    (["--hidden-size", "0"], r"--hidden-size must be a positive integer, got 0"),
    (["--reward-timeout", "0"], r"--reward-timeout must be in \(0, inf\), got 0.0"),
    (["--reward-timeout", "nan"], r"--reward-timeout must be a finite number"),
    (["--max-reward-failure-frac", "1.5"], r"--max-reward-failure-frac must be in \[0, 1\], got 1.5"),
    (["--reward-workers", "0"], r"--reward-workers must be a positive integer, got 0"),
]


@pytest.mark.parametrize("argv, match", FLAGS, ids=[" ".join(row[0]) for row in FLAGS])
def test_flag_refused(argv, match):
    with pytest.raises(TrainerArgsError, match=match):
        parse_args(argv)


# ------------------------------------------------------------------------------------------------
# checkpoints (directory checks, before Megatron is involved; the real saves are in the torchrun test)
# ------------------------------------------------------------------------------------------------

def _fake_run(root, steps, *, model=None, complete=True):
    """A checkpoint directory as save_checkpoint leaves it (files listed with their sizes)."""
    os.makedirs(root, exist_ok=True)
    for step in steps:
        path = checkpoint.checkpoint_path(str(root), step)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "__0_0.distcp"), "wb") as fh:
            fh.write(b"x" * 64)
        state = {"step": step, "files": {"__0_0.distcp": 64},
                 "model": model or {"hidden_size": 32, "vocab_size": 32, "num_layers": 4}}
        if complete:
            checkpoint.atomic_write_text(os.path.join(path, checkpoint.STATE_FILE), json.dumps(state))
    checkpoint.atomic_write_text(os.path.join(root, checkpoint.TRACKER_FILE), f"{steps[-1]}\n")
    return str(root)


def _truncate(root, step):
    with open(os.path.join(checkpoint.checkpoint_path(root, step), "__0_0.distcp"), "wb") as fh:
        fh.write(b"x")
    return root


def _tracker(root, text):
    checkpoint.atomic_write_text(os.path.join(root, checkpoint.TRACKER_FILE), text)
    return root


CHECKPOINTS = [
    ("fresh run on another run's --save",
     lambda p: checkpoint.check_save_dir(_fake_run(p / "a", [2, 4]), None),
     r"--save .*a already holds checkpoints of another run \(latest step 4\).*--load .*a"),
    ("--save of one run, --load of another", lambda p: checkpoint.check_save_dir(
        _fake_run(p / "a", [2]), _fake_run(p / "b", [3])), r"already holds checkpoints"),
    ("iter directories without tracker", lambda p: checkpoint.check_save_dir(
        str(os.makedirs(p / "a" / "iter_0000003") or p / "a"), None), r"iter_\* directories \[3\]"),
    ("truncated latest", lambda p: checkpoint.resolve_step(_truncate(_fake_run(p / "a", [2, 4]), 4)),
     r"iter_0000004 is incomplete or corrupt: __0_0.distcp has 1 bytes, the save wrote 64; "
     r"--load-fallback resumes from step 2"),
    ("state file missing", lambda p: checkpoint.resolve_step(_fake_run(p / "a", [4], complete=False)),
     r"trainer_state.json is missing.*no earlier complete checkpoint"),
    ("corrupt tracker", lambda p: checkpoint.resolve_step(_tracker(_fake_run(p / "a", [2]), "4x\n")),
     r"expected a step number, got '4x'"),
    ("fallback with nothing complete", lambda p: checkpoint.resolve_step(
        _fake_run(p / "a", [2, 4], complete=False), fallback=True), r"found no earlier complete checkpoint"),
    ("model of another size", lambda p: checkpoint.check_model(
        _fake_run(p / "a", [2]), 2, {"hidden_size": 64, "vocab_size": 48, "num_layers": 4}),
     r"--hidden-size 64 \(checkpoint: 32\), --vocab-size 48 \(checkpoint: 32\)"),
    ("no checkpoint at all", lambda p: checkpoint.resolve_step(str(p)), r"holds no checkpoint"),
]


@pytest.mark.parametrize("name, call, match", CHECKPOINTS, ids=[row[0] for row in CHECKPOINTS])
def test_checkpoint_refused(tmp_path, name, call, match):
    with pytest.raises((CheckpointError, FileNotFoundError), match=match):
        call(tmp_path)


def test_safe_checkpoint_fallback_and_resume_target(tmp_path):
    """SAFE: --load-fallback picks the newest complete step; resuming into the same --save is allowed."""
    root = _truncate(_fake_run(tmp_path / "a", [2, 4, 6]), 6)
    step, note = checkpoint.resolve_step(root, fallback=True)
    assert step == 4 and "resuming from step 4" in note
    assert checkpoint.resolve_step(_tracker(root, "junk"), fallback=True)[0] == 4
    checkpoint.check_save_dir(root, root)                     # resume: no error
    checkpoint.check_save_dir(str(tmp_path / "new"), None)    # empty / new: no error


def test_safe_atomic_writes_and_metrics_once(tmp_path):
    """SAFE: the tracker is replaced whole (no temporary file left); a resume drops the metrics lines after
    the loaded step, so every step appears once."""
    tracker = tmp_path / checkpoint.TRACKER_FILE
    checkpoint.atomic_write_text(str(tracker), "3\n")
    checkpoint.atomic_write_text(str(tracker), "5\n")
    assert tracker.read_text() == "5\n" and os.listdir(tmp_path) == [checkpoint.TRACKER_FILE]
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)))
    assert safety.truncate_metrics(str(metrics), 2) == 2
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2]


# ------------------------------------------------------------------------------------------------
# the audit (refused before any process starts: exit status 2 and the message)
# ------------------------------------------------------------------------------------------------

AUDIT = [
    (["--kl-coef", "nan"], r"--kl-coef must be a finite number >= 0, got nan"),
    (["--entropy-coef", "inf"], r"--entropy-coef must be a finite number >= 0, got inf"),
    (["--tolerance", "nan"], r"--tolerance must be > 0, got nan"),
    (["--layouts", "tp3"],
     r"layout tp3: --num-attention-heads 4 and --vocab-size 128 must be divisible by tp = 3"),
    (["--modes", "token_avg"], r"unknown loss aggregation 'token_avg'"),
    (["--modes", ""], r"--modes: no mode given in \[''\]; valid: all, token_mean"),
    (["--modes", " , ;"], r"--modes: no mode given"),
    (["--layouts", ""], r"no layout given in \[''\]"),
    (["--layouts", ","], r"no layout given"),
    (["--layouts", "dp3", "--batch-size", "16"], r"--batch-size 16 is not divisible by dp\*m = 3"),
]


@pytest.mark.parametrize("argv, match", AUDIT, ids=[" ".join(row[0]) for row in AUDIT])
def test_audit_refused(capsys, argv, match):
    from megatron_rl_agg.cli import main

    assert main(["check-invariance", *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err


def test_every_issue_example_is_a_row():
    """The examples of the reliability issue, each covered above."""
    names = {row[0] for row in API + ROLLOUTS} | {row[0] for row in YAML} | {" ".join(r[0]) for r in FLAGS}
    for example in ("--kl-coef nan", "--clip-eps-low nan", "--entropy-coef inf", "--temperature nan",
                    "quoted false for a flag", "float for an int", "logprob -200",
                    "over-long row in a later mini-batch", "mask 0.5", "group ids float", "group ids as list",
                    "mode int", "values/mask shapes", "config of another objective", "reward 1e200"):
        assert example in names, example
    total = len(API) + len(ROLLOUTS) + len(YAML) + len(FLAGS) + len(CHECKPOINTS) + len(AUDIT)
    assert total >= 40
