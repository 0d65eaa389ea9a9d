"""The counting task: prompts, target and the partial-credit reward, with the arithmetic written out."""

import pytest
import torch

from megatron_rl_agg.trainer.rollout import task
from megatron_rl_agg.trainer.rollout.task import BOS, EOS, CountingTask, len_token


def test_target_counts_on_modulo_ten():
    # s = 8, n = 3: 9, 0, 1 then EOS
    assert task.target_response([BOS, 4, len_token(3), 8]) == [9, 0, 1, EOS]


# s = 8, n = 3, target 9 0 1 EOS. reward = (0.2 * digits + 0.6 * steps) / 3 + 0.2 * exact, where a step is
# a digit equal to (previous token + 1) % 10 and the previous token of the first digit is s = 8.
@pytest.mark.parametrize("response, expected", [
    ([9, 0, 1, EOS], (0.2 * 3 + 0.6 * 3) / 3 + 0.2),     # exact: 1.0
    ([9, 0, 1, 2, EOS], 0.8),                              # one digit too many -> no stop credit
    ([9, 0, 1, 2, 3, 4], 0.8),                             # truncated, first 3 right
    ([9, 5, 6, EOS], (0.2 * 3 + 0.6 * 2) / 3),            # 8->9 ok, 9->5 wrong, 5->6 ok: 2 steps
    ([9, 5, 1, EOS], (0.2 * 3 + 0.6 * 1) / 3),            # 9->5 and 5->1 wrong: 1 step
    ([9, EOS], (0.2 * 1 + 0.6 * 1) / 3),                   # stopped after one right digit
    ([EOS], 0.0),
    ([], 0.0),
    ([3, 9, 0], (0.2 * 3 + 0.6 * 1) / 3),                 # 8->3 no, 3->9 no, 9->0 yes
    ([20, 0, 25], 0.2 * 1 / 3),                            # one digit; 20->0 is no step (20 no digit)
])
def test_reward_partial_credit(response, expected):
    assert task.reward([BOS, len_token(3), 8], response) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [[len_token(2), 3], [BOS, 3], [BOS, len_token(2), EOS],
                                 [BOS, EOS, len_token(2), 3], [BOS, 5, 3]])
def test_malformed_prompt_is_rejected(bad):
    with pytest.raises(ValueError, match="not a counting-task prompt"):
        task.reward(bad, [1])


def test_sampled_prompts_are_valid_deterministic_and_varied():
    spec = CountingTask(min_count=2, max_count=5, max_distractors=2)
    a = spec.sample_prompts(200, torch.Generator().manual_seed(3))
    b = spec.sample_prompts(200, torch.Generator().manual_seed(3))
    assert a == b
    counts = {task.parse_prompt(p)[1] for p in a}
    assert counts == {2, 3, 4, 5}
    assert {len(p) for p in a} == {3, 4, 5}                        # 0..2 distractors
    assert max(max(p) for p in a) < spec.min_vocab_size
    assert all(task.reward(p, task.target_response(p)) == pytest.approx(1.0) for p in a)


def test_random_policy_scores_near_chance():
    # A uniform policy over V tokens emits a digit w.p. 10/V. The first step (from s) is right w.p. 1/V,
    # a later one w.p. (10/V) * (1/V) (its previous token must be a digit). For V = 32, averaged over
    # n = 2..5: E[steps / n] = mean((1 + (n - 1) * 10/32) / n) / 32 = 0.533 / 32, so
    # E[reward] ~ 0.2 * 10/32 + 0.6 * 0.533 / 32 = 0.0725 (a bit less: an early EOS cuts the body; the
    # stop credit needs n + 1 exact tokens, probability V^-(n+1), negligible).
    spec, vocab = CountingTask(), 32
    g = torch.Generator().manual_seed(0)
    prompts = spec.sample_prompts(4000, g)
    rewards = [task.reward(p, torch.randint(0, vocab, (8,), generator=g).tolist()) for p in prompts]
    assert sum(rewards) / len(rewards) == pytest.approx(0.2 * 10 / 32 + 0.6 * 0.533 / 32, rel=0.15)


def test_vocab_and_config_checks():
    with pytest.raises(ValueError, match="min_count <= max_count"):
        CountingTask(min_count=4, max_count=3)
    with pytest.raises(ValueError, match="--vocab-size 16 is too small"):
        CountingTask(max_count=5).check_vocab(16)
