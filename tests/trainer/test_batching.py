"""Row layout, data-parallel shards and masked padding rows."""

import pytest
import torch

from megatron_rl_agg.core.rows import shard_bounds
from megatron_rl_agg.trainer.step import batching
from megatron_rl_agg.trainer.rollout.rollouts import Sample


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
    bounds = [shard_bounds(rows, dp, r) for r in range(dp)]
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [e - s for s, e in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_pad_rows_adds_masked_rows_with_reserved_group():
    samples = [_s([1], [2, 3], float(i), pid=i // 2) for i in range(3)]
    batch = batching.build_rows(samples, 4, [5, 5, 6])
    adv = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    local, local_adv = batching.pad_rows(batch, adv, total=6, dp_rank=1)
    assert local.num_rows == 6
    assert local.group_ids.tolist() == [5, 5, 6, -2, -2, -2]        # -1 - dp_rank
    assert local.rewards.tolist() == [0.0, 1.0, 2.0, 0.0, 0.0, 0.0]
    assert local_adv.tolist() == [1.0, 2.0, 3.0, 0.0, 0.0, 0.0]
    assert local.loss_mask[3:].sum() == 0 and local.loss_mask[:3].sum() == 6
    assert batching.pad_rows(batch, adv, total=3, dp_rank=0)[0].num_rows == 3
    with pytest.raises(ValueError, match="cannot pad 3 rows down to 2"):
        batching.pad_rows(batch, adv, total=2, dp_rank=0)
