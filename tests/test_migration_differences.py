"""Pin down, with numbers, where our conventions differ from what peer frameworks compute, so the
migration notes in docs/aggregation.md and docs/normalization.md stay true. The peer formulas are
restated here from their documented definitions (dividing by every row, counting masked prompts)."""

import pytest
import torch

from megatron_rl_agg import aggregate

V = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
M = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])


def all_rows_seq_mean_token_mean(v, m):
    """Sequence mean that divides by every row, fully masked ones included (verl's trainer batch size)."""
    tok = m.sum(1).double()
    return ((v * m).sum(1) / tok.clamp(min=1)).sum() / v.shape[0]


def all_rows_seq_mean_token_sum(v, m):
    return (v * m).sum() / v.shape[0]


def all_rows_dr_grpo(v, m, horizon):
    return (v * m).sum() / (v.shape[0] * horizon)


def test_sequence_modes_count_live_rows_only():
    # ours: live rows = 2 -> (6/3 + 4/1) / 2 = 3.0; dividing by all 3 rows gives 6/3 = 2.0
    assert aggregate(V, M, "seq_mean_token_mean").item() == pytest.approx(3.0)
    assert all_rows_seq_mean_token_mean(V, M).item() == pytest.approx(2.0)
    # (6 + 4) / 2 = 5.0 vs 10 / 3 = 3.33
    assert aggregate(V, M, "seq_mean_token_sum").item() == pytest.approx(5.0)
    assert all_rows_seq_mean_token_sum(V, M).item() == pytest.approx(10 / 3)
    # 10 / (2 * 3) = 1.667 vs 10 / (3 * 3) = 1.111
    assert aggregate(V, M, "seq_mean_token_sum_norm", max_response_length=3).item() == pytest.approx(10 / 6)
    assert all_rows_dr_grpo(V, M, 3).item() == pytest.approx(10 / 9)


def test_all_masked_token_mean_is_zero_where_a_plain_ratio_is_nan():
    zeros = torch.zeros_like(M)
    assert aggregate(V, zeros, "token_mean").item() == 0.0
    assert torch.isnan((V * zeros).sum() / zeros.sum())


def test_prompt_mean_ignores_fully_masked_prompts():
    # groups [2, 1]: group A = rows 0, 1 -> 10 / 4 = 2.5; group B = row 2, fully masked.
    # ours: only live groups count -> 2.5; counting B as a group with mean 0 gives (2.5 + 0) / 2 = 1.25.
    assert aggregate(V, M, "prompt_mean", group_sizes=[2, 1]).item() == pytest.approx(2.5)
    counting_masked = (2.5 + 0.0) / 2
    assert counting_masked == pytest.approx(1.25)


def test_legacy_trailing_microbatch_counts():
    # rows [[1,2],[5,7],[3,.]], micro_batch_size 2: mb0 = (1+2+5+7)/4 = 3.75, mb1 = 3/1 = 3.
    # ours counts the trailing short micro-batch: (3.75 + 3) / 2 = 3.375; dropping it gives 3.75.
    v = torch.tensor([[1.0, 2.0], [5.0, 7.0], [3.0, 0.0]])
    m = torch.tensor([[1, 1], [1, 1], [1, 0]])
    assert aggregate(v, m, "token_mean_legacy", micro_batch_size=2).item() == pytest.approx(3.375)
