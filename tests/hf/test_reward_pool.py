"""Rewards in worker processes (``megatron_rl_agg.hf.reward_pool``): a per-sample time limit that kills a
runaway parse (the real math_verify on ``\\boxed{9^{9^{9^{9}}}}``, a reward that sleeps), a raising and a
non-finite reward, no leaked processes; a sample without a reward is invalid, and the advantages equal
exactly those of the same batch with its rows marked invalid by hand; more than
``--max-reward-failure-frac`` failing stops the run naming the reward, the fraction and the prompt."""

from __future__ import annotations

import math
import os
import pathlib
import sys
import time
from types import SimpleNamespace

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hf_models import prompt_texts, train_tokenizer  # noqa: E402

from megatron_rl_agg.hf.reward_pool import RewardPool, RewardWorkerError  # noqa: E402

PROMPTS = HERE.parents[1] / "examples" / "gsm8k_mini.jsonl"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:          # a zombie is gone too
        return fh.read().split(")")[-1].split()[0] != "Z"


def test_math_verify_runaway_is_killed_in_seconds():
    start = time.monotonic()
    with RewardPool("math_verify", timeout=2.0) as pool:
        got = pool.score([("q", "so the answer is \\boxed{7}", "7"),
                          ("q", "so the answer is \\boxed{9^{9^{9^{9}}}}", "7"),
                          ("q", "the answer is \\boxed{8}", "7")])
        pids = pool.pids
        assert pool.num_killed == 1
    elapsed = time.monotonic() - start
    assert [r.value for r in got] == [1.0, None, 0.0]
    assert got[1].error == "timed out after 2 s" and got[0].ok and got[2].ok
    assert elapsed < 60, elapsed               # the parse alone runs for minutes
    assert pids and not any(_alive(p) for p in pids)


def test_sleeping_raising_and_non_finite_rewards():
    items = [("q", r, "7") for r in ("7", "sleep", "raise", "8", "nan", "sleep", "inf", "7")]
    start = time.monotonic()
    pool = RewardPool("reward_fixtures:flaky", timeout=1.0, workers=2)
    try:
        got = pool.score(items)
        seen = set(pool.pids)
        again = pool.score([("q", "7", "7")])             # the replaced workers score on
        seen |= set(pool.pids)
    finally:
        pool.close()
    assert time.monotonic() - start < 60
    assert [r.value for r in got] == [1.0, None, None, 0.25, None, None, None, 1.0]
    assert [r.error for r in got] == [None, "timed out after 1 s", "raised ZeroDivisionError: the parser divided "
                                      "by zero", None, "non-finite reward nan", "timed out after 1 s",
                                      "non-finite reward inf", None]
    assert again[0].value == 1.0 and pool.num_killed == 2
    assert not any(_alive(p) for p in seen) and pool.pids == []


def test_bad_pool_settings_and_a_reward_that_does_not_load():
    with pytest.raises(ValueError, match="reward timeout must be a positive number of seconds, got 0"):
        RewardPool("exact_match", timeout=0)
    with pytest.raises(ValueError, match="reward workers must be an int >= 1, got 0"):
        RewardPool("exact_match", workers=0)
    with RewardPool("no_such_module_xyz:score") as pool:
        with pytest.raises(RewardWorkerError, match="does not load in a reward worker: RewardError: .*does not import"):
            pool.score([("q", "r", "a")])


def test_failed_rewards_give_the_advantages_of_rows_marked_invalid_by_hand():
    """4 groups x 4 samples; the reward fails (timeout, raise, nan, inf) on chosen samples: the trainer's
    path (scores -> samples -> rows -> compute_step_advantages) equals, bit for bit, the same rows with those
    samples marked invalid by hand (and any reward there), and differs from scoring the failures 0."""
    from megatron_rl_agg.core.config import AdvantageConfig
    from megatron_rl_agg.parallel.advantages import compute_step_advantages
    from megatron_rl_agg.trainer.rollout.generation import score_responses
    from megatron_rl_agg.trainer.rollout.rollouts import Sample
    from megatron_rl_agg.trainer.step.batching import build_rows

    texts = ["7", "8", "raise", "7",   "sleep", "8", "8", "7",   "nan", "7", "9", "inf",   "7", "8", "7", "8"]
    answers = ["7"] * 16
    with RewardPool("reward_fixtures:flaky", timeout=1.0, workers=2) as pool:
        task = SimpleNamespace(rewards=lambda prompts, responses: pool.score(
            [("q", r, a) for r, a in zip(responses, prompts)]))
        scored = score_responses(task, answers, texts)
    failed = [i for i, t in enumerate(texts) if t in ("raise", "sleep", "nan", "inf")]
    assert [i for i, (_, err) in enumerate(scored) if err is not None] == failed
    gids = [i // 4 for i in range(16)]

    def rows_of(rewards, errors):
        samples = [Sample(gids[i], (1, 2), (3, 4, i % 5 + 1), rewards[i], "stop" if i % 3 else "length", None,
                          f"row {i}", errors[i]) for i in range(16)]
        return build_rows(samples, 8, gids)

    cfg = AdvantageConfig(adv_estimator="grpo", overlong_policy="zero_advantage")
    got = rows_of([r for r, _ in scored], [e for _, e in scored])
    adv, keep, stats = compute_step_advantages(got.rewards, got.group_ids, truncated=got.truncated,
                                               sample_valid=got.valid, cfg=cfg)
    by_hand = [123.0 if i in failed else r for i, (r, _) in enumerate(scored)]
    hand = rows_of(by_hand, [None] * 16)
    valid = torch.tensor([i not in failed for i in range(16)])
    want_adv, want_keep, want_stats = compute_step_advantages(hand.rewards, hand.group_ids, truncated=hand.truncated,
                                                              sample_valid=valid, cfg=cfg)
    assert torch.equal(adv, want_adv) and torch.equal(keep, want_keep) and stats == want_stats
    assert not keep[failed].any() and torch.all(adv[failed] == 0)
    zeros = rows_of([0.0 if i in failed else r for i, (r, _) in enumerate(scored)], [None] * 16)
    as_zero, _, _ = compute_step_advantages(zeros.rewards, zeros.group_ids, truncated=zeros.truncated, cfg=cfg)
    assert not torch.equal(as_zero, adv)


def _trainer(tmp_path, frac: float):
    """A one-rank trainer view (args, source, no process group) over the shipped prompt file."""
    from megatron_rl_agg.hf.prompts import TextTask, load_tokenizer
    from megatron_rl_agg.trainer.rollout.generation import RolloutSpec
    from megatron_rl_agg.trainer.rollout.sources import OnPolicySource

    train_tokenizer(str(tmp_path / "tok"), prompt_texts(str(PROMPTS)))
    tok = load_tokenizer(str(tmp_path / "tok"))
    task = TextTask.from_file(str(PROMPTS), tok, RewardPool("reward_fixtures:flaky"), seed=1)
    spec = RolloutSpec(task=task, num_prompts=2, samples_per_prompt=4, max_new_tokens=4, temperature=1.0,
                       failure_prob=0.0, vocab_size=len(tok), seed=1)
    args = SimpleNamespace(reward="reward_fixtures:flaky", reward_timeout=10.0, max_reward_failure_frac=frac)
    return SimpleNamespace(args=args, source=OnPolicySource(spec, 64, 4), dp_group=None), task


@pytest.mark.parametrize("failing,frac,stops", [(4, 0.5, False), (5, 0.5, True), (1, 0.0, True), (8, 1.0, False)])
def test_failure_fraction_stops_the_run(tmp_path, failing, frac, stops):
    from megatron_rl_agg.trainer.loop import train
    from megatron_rl_agg.trainer.loop.safety import RewardFailureError
    from megatron_rl_agg.trainer.rollout.rollouts import Sample
    from megatron_rl_agg.trainer.rollout.sources import StepRows

    tr, task = _trainer(tmp_path, frac)
    first = 8 - failing                                 # rows first .. 7 fail (global rows of step 1)
    samples = [Sample(g // 4, (1,), (2,), math.nan if g >= first else 1.0, "stop", None, f"step 1 row {g}",
                      "raised X" if g >= first else None) for g in range(8)]
    step_rows = StepRows(samples, [g // 4 for g in range(8)])
    sums = train._row_sums(step_rows, None)
    assert sums["num_reward_failures"] == failing and sums["num_rewarded"] == 8 - failing
    assert sums["reward_sum"] == 8 - failing            # the failed rows' NaN is never summed
    if not stops:
        train._check_reward_failures(tr, 1, step_rows, sums)
        return
    prompt = task.step_prompts(2, 1)[first // 4].text
    with pytest.raises(RewardFailureError) as err:
        train._check_reward_failures(tr, 1, step_rows, sums)
    message = str(err.value)
    assert message.startswith(f"--reward reward_fixtures:flaky: {failing} of 8 samples of step 1 have no reward "
                              f"(fraction {failing / 8:.3g} > --max-reward-failure-frac {frac:g}")
    assert f"first failing prompt (row {first}): {prompt!r}"[:120] in message
