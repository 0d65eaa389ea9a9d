"""Row layout, data-parallel shards and masked padding rows."""

import pytest
import torch

from megatron_rl_agg.trainer import batching
from megatron_rl_agg.trainer.rollouts import Sample


def _s(prompt, response, reward=0.0, finish="stop", logprobs=None, pid=0):
    return Sample(pid, tuple(prompt), tuple(response), reward, finish, logprobs, "t")


def test_row_layout_shifts_by_one_and_masks_the_response():
    # full = [7, 8, 1, 2, 3]: input 7 8 1 2 | labels 8 1 2 3; response tokens 1 2 3 are the labels
    # at positions 1..3 (len(prompt) - 1 = 1 up to len(full) - 1 = 4).
    b = batching.build_rows([_s([7, 8], [1, 2, 3], 0.5, logprobs=(-1.0, -2.0, -3.0))], 6, [0])
    assert b.tokens.tolist() == [[7, 8, 1, 2, 0, 0]]
    assert b.labels.tolist() == [[8, 1, 2, 3, 0, 0]]
    assert b.loss_mask.tolist() == [[0, 1, 1, 1, 0, 0]]
    assert b.old_logprobs.tolist() == [[0, -1, -2, -3, 0, 0]]
    assert b.rewards.tolist() == [0.5] and b.truncated.tolist() == [False]


def test_row_too_long_and_mixed_logprobs_are_rejected():
    with pytest.raises(ValueError, match="5 tokens exceed --seq-length 3"):
        batching.build_rows([_s([1, 2], [3, 4, 5])], 3, [0])
    with pytest.raises(ValueError, match="without 'logprobs'"):
        batching.build_rows([_s([1], [2], logprobs=(-1.0,)), _s([1], [2])], 4, [0, 1])


def test_empty_response_row_is_fully_masked():
    b = batching.build_rows([_s([1, 2], [])], 4, [0])
    assert b.loss_mask.sum() == 0


@pytest.mark.parametrize("rows, dp", [(10, 2), (11, 2), (7, 3), (2, 4), (0, 2)])
def test_shards_cover_rows_once_and_differ_by_at_most_one(rows, dp):
    bounds = [batching.shard_bounds(rows, dp, r) for r in range(dp)]
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [e - s for s, e in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_padded_local_rows():
    # 10 rows, dp 2 -> 5 per rank -> 3 micro-batches of 2 -> 6 rows each (1 padding row per rank)
    assert batching.padded_local_rows(10, 2, 2) == 6
    assert batching.padded_local_rows(8, 2, 2) == 4
    assert batching.padded_local_rows(11, 2, 1) == 6
    assert batching.padded_local_rows(0, 2, 3) == 3


def test_shard_and_pad_adds_masked_rows_with_fresh_group():
    samples = [_s([1], [2, 3], float(i), pid=i // 2) for i in range(5)]
    batch = batching.build_rows(samples, 4, [i // 2 for i in range(5)])     # groups 0 0 1 1 2
    adv = torch.arange(5, dtype=torch.float64) + 1
    local, local_adv = batching.shard_and_pad(batch, adv, dp_size=2, dp_rank=1, micro_batch_size=2)
    # rank 1 gets rows 3, 4 (rank 0 takes the extra row 0..2), padded to 4 rows
    assert local.num_rows == 4
    assert local.group_ids.tolist() == [1, 2, 4, 4]          # padding id = max(2) + 1 + dp_rank
    assert local.rewards.tolist() == [3.0, 4.0, 0.0, 0.0]
    assert local_adv.tolist() == [4.0, 5.0, 0.0, 0.0]
    assert local.loss_mask[2:].sum() == 0 and local.loss_mask[:2].sum() == 4
