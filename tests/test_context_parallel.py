"""Megatron's zigzag context-parallel split (pure index math) and what it means for the loss weights."""

import pytest
import torch

from megatron_rl_agg.core.aggregation import microbatch_mean_weights
from megatron_rl_agg.parallel.weights import token_weights
from megatron_rl_agg.core.context_parallel import (
    check_cp_seq_length, merge_cp_shards, split_for_cp_rank, zigzag_indices,
)


def test_zigzag_indices_written_out():
    # S = 8, C = 2: four chunks of 2; rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and 2.
    assert zigzag_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    # S = 8, C = 4: eight chunks of 1; rank r keeps r and 7 - r.
    assert [zigzag_indices(8, 4, r).tolist() for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert zigzag_indices(6, 1, 0).tolist() == list(range(6))


def test_split_matches_megatrons_view_and_index_select():
    """get_batch_on_this_cp_rank: view [b, 2C, S/2C], index_select [r, 2C-1-r], view [b, S/C]."""
    x = torch.arange(3 * 12).view(3, 12)
    for cp in (2, 3):
        for r in range(cp):
            expected = x.view(3, 2 * cp, -1).index_select(1, torch.tensor([r, 2 * cp - 1 - r])).view(3, -1)
            assert torch.equal(split_for_cp_rank(x, cp, r), expected)


def test_merge_inverts_split():
    x = torch.randn(2, 12, 5)
    for cp in (1, 2, 3):
        shards = torch.stack([split_for_cp_rank(x, cp, r, dim=1) for r in range(cp)])
        assert torch.equal(merge_cp_shards(shards, dim=1), x)


def test_bad_sequence_length_names_the_values():
    with pytest.raises(ValueError, match=r"sequence length 10 is not divisible by 2 \* context_parallel_size = 4"
                                         r".*--seq-length 12"):
        check_cp_seq_length(10, 2)
    with pytest.raises(ValueError, match="cp_rank 2 is outside"):
        zigzag_indices(8, 2, 2)


def test_weights_from_full_rows_sliced_keep_every_aggregate():
    """Weights computed on the full rows, then split: the shards' weighted sums add up to the full sum for a
    global mode (token_mean: 1 / N_tok) and for the micro-batch mean (1 / n_full, the WHOLE micro-batch's
    tokens), while the shard-local mean (1 / n_shard) would not."""
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.float64)
    values = torch.arange(16, dtype=torch.float64).view(2, 8)
    full_sum = (values * mask).sum() / mask.sum()                    # 11 tokens
    for w in (token_weights(mask, "token_mean", dtype=torch.float64),
              microbatch_mean_weights(mask, dtype=torch.float64)):
        shards = [(split_for_cp_rank(w, 2, r) * split_for_cp_rank(values, 2, r)).sum() for r in range(2)]
        assert float(sum(shards)) == pytest.approx(float(full_sum))
    shard_local = sum((microbatch_mean_weights(split_for_cp_rank(mask, 2, r), dtype=torch.float64)
                       * split_for_cp_rank(values, 2, r)).sum() for r in range(2))
    assert abs(float(shard_local) - float(full_sum)) > 1.0
