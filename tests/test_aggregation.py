"""Layer 1: every aggregation mode on tiny tensors, arithmetic written out."""

import pytest
import torch

from megatron_rl_agg import LOSS_AGGREGATIONS, aggregate, microbatch_mean_weights, token_weights
from megatron_rl_agg.core.aggregation import aggregation_names, get_aggregation, resolve_aggregation

# Three rows, T = 3. Row 0 has 3 loss tokens, row 1 has 1, row 2 is fully masked (its 9s never count).
VALUES = torch.tensor([[1.0, 2.0, 3.0],
                       [4.0, 0.0, 0.0],
                       [9.0, 9.0, 9.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1],
                     [1, 0, 0],
                     [0, 0, 0]])
GROUPS = [2, 1]  # rows {0, 1} are one prompt group, row 2 its own (fully masked) group
L = 3

# Hand arithmetic:
#   token_mean             (1+2+3+4) / 4 tokens                    = 2.5
#   token_sum              1+2+3+4                                 = 10
#   seq_mean_token_mean    mean over live rows (6/3, 4/1) = (2+4)/2 = 3.0
#   seq_mean_token_sum     (6 + 4) / 2 live rows                    = 5.0
#   seq_mean_token_sum_norm 10 / (2 live rows * L=3)                = 1.6667
#   prompt_mean            group {0,1}: 10/4 = 2.5; group {2} dead  = 2.5
#   token_mean_legacy, micro_batch_size=2: mb0 = 10/4 = 2.5, mb1 all masked = 0 -> (2.5 + 0) / 2 = 1.25
EXPECTED = {
    "token_mean": 2.5,
    "token_sum": 10.0,
    "seq_mean_token_mean": 3.0,
    "seq_mean_token_sum": 5.0,
    "seq_mean_token_sum_norm": 10.0 / 6.0,
    "prompt_mean": 2.5,
    "token_mean_legacy": 1.25,
}
KW = dict(group_sizes=GROUPS, max_response_length=L)


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregate_by_hand(mode):
    got = aggregate(VALUES, MASK, mode, micro_batch_size=2, **KW)
    assert got.item() == pytest.approx(EXPECTED[mode], rel=1e-12)


@pytest.mark.parametrize("mode", [m for m in LOSS_AGGREGATIONS if m != "token_mean_legacy"])
def test_weights_reproduce_aggregate(mode):
    w = token_weights(MASK, mode, dtype=torch.float64, **KW)
    assert (w * VALUES).sum().item() == pytest.approx(EXPECTED[mode], rel=1e-12)
    assert torch.all(w[MASK == 0] == 0)


def test_weight_values_by_hand():
    # seq_mean_token_mean: row 0 tokens get 1 / (2 live rows * 3 tokens) = 1/6, row 1 gets 1 / (2 * 1).
    w = token_weights(MASK, "seq_mean_token_mean", dtype=torch.float64)
    assert torch.allclose(w, torch.tensor([[1 / 6] * 3, [0.5, 0, 0], [0, 0, 0]], dtype=torch.float64))
    # prompt_mean: 1 live group of 4 tokens -> every token 1/4.
    w = token_weights(MASK, "prompt_mean", group_sizes=GROUPS, dtype=torch.float64)
    assert torch.allclose(w, MASK.double() / 4)


def test_prompt_mean_two_groups_by_hand():
    # groups [1, 2]: group A = row 0 (3 tokens, sum 6) -> mean 2; group B = rows 1, 2 (1 token, 4) -> 4.
    # prompt_mean = (2 + 4) / 2 = 3; token weights: row 0 1/(2*3), row 1 1/(2*1).
    assert aggregate(VALUES, MASK, "prompt_mean", group_sizes=[1, 2]).item() == pytest.approx(3.0)
    w = token_weights(MASK, "prompt_mean", group_sizes=[1, 2], dtype=torch.float64)
    assert (w * VALUES).sum().item() == pytest.approx(3.0)


def test_legacy_differs_from_token_mean_when_microbatch_counts_differ():
    # mb0 = row 0 (3 tokens, mean 2), mb1 = row 1 (1 token, mean 4): legacy (2 + 4) / 2 = 3 != 2.5.
    two = VALUES[:2], MASK[:2]
    assert aggregate(*two, "token_mean_legacy", micro_batch_size=1).item() == pytest.approx(3.0)
    assert aggregate(*two, "token_mean").item() == pytest.approx(2.5)


def test_all_masked_is_zero_not_nan():
    zeros = torch.zeros_like(MASK)
    for mode in LOSS_AGGREGATIONS:
        assert aggregate(VALUES, zeros, mode, micro_batch_size=1, **KW).item() == 0.0
        if mode != "token_mean_legacy":
            w = token_weights(zeros, mode, **KW)
            assert torch.all(w == 0) and not torch.isnan(w).any()


def test_masked_nan_values_are_ignored():
    v = VALUES.clone()
    v[2] = float("nan")
    for mode in LOSS_AGGREGATIONS:
        assert aggregate(v, MASK, mode, micro_batch_size=2, **KW).item() == pytest.approx(EXPECTED[mode])


def test_microbatch_mean_weights():
    # 4 tokens in this micro-batch -> each weighs 1/4; an empty micro-batch weighs nothing.
    assert torch.allclose(microbatch_mean_weights(MASK), MASK.float() / 4)
    assert torch.all(microbatch_mean_weights(torch.zeros(2, 3)) == 0)


# ----------------------------------------------------------------------------------------------
# names and errors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alias,canonical", [
    ("seq_mean", "seq_mean_token_mean"),
    ("sequence_mean", "seq_mean_token_mean"),
    ("seq-mean-token-mean", "seq_mean_token_mean"),
    ("seq-mean-token-sum", "seq_mean_token_sum"),
    ("seq-mean-token-sum-norm", "seq_mean_token_sum_norm"),
    ("token-mean", "token_mean"),
    ("token-sum", "token_sum"),
    ("Token_Mean", "token_mean"),
    ("dr_grpo", "seq_mean_token_sum_norm"),
    ("prompt-mean", "prompt_mean"),
])
def test_aliases_resolve(alias, canonical):
    assert resolve_aggregation(alias) == canonical


def test_seven_canonical_names():
    assert LOSS_AGGREGATIONS == ("token_mean", "token_sum", "seq_mean_token_mean", "seq_mean_token_sum",
                                 "seq_mean_token_sum_norm", "prompt_mean", "token_mean_legacy")


def test_unknown_name_lists_every_name_and_alias():
    with pytest.raises(ValueError) as err:
        resolve_aggregation("seq_mean_tokens")
    msg = str(err.value)
    assert "'seq_mean_tokens'" in msg
    for name in aggregation_names():   # every canonical name (token_mean_legacy included) and alias
        assert name in msg
    assert "token_mean_legacy" in msg


def test_missing_horizon_is_a_clear_error():
    for fn in (lambda: aggregate(VALUES, MASK, "seq_mean_token_sum_norm"),
               lambda: token_weights(MASK, "seq-mean-token-sum-norm")):
        with pytest.raises(ValueError, match="max_response_length"):
            fn()
    with pytest.raises(ValueError, match="positive int, got 0"):
        token_weights(MASK, "seq_mean_token_sum_norm", max_response_length=0)


def test_prompt_mean_without_groups_is_a_clear_error():
    with pytest.raises(ValueError, match="'prompt_mean' needs prompt groups.*group_sizes.*group_ids"):
        token_weights(MASK, "prompt_mean")
    with pytest.raises(ValueError, match="prompt groups"):
        aggregate(VALUES, MASK, "prompt_mean")


@pytest.mark.parametrize("sizes,match", [([2, 2], "sum to 4 but the batch has 3"),
                                         ([3, 0], "positive ints"),
                                         ([4, -1], "positive ints")])
def test_bad_group_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        token_weights(MASK, "prompt_mean", group_sizes=sizes)


def test_non_contiguous_group_ids_rejected():
    with pytest.raises(ValueError, match="contiguous"):
        token_weights(MASK, "prompt_mean", group_ids=torch.tensor([0, 1, 0]))


def test_legacy_has_no_global_weights():
    with pytest.raises(ValueError, match="per-micro-batch mean.*microbatch_mean_weights"):
        token_weights(MASK, "token_mean_legacy")


def test_registry_flags():
    assert get_aggregation("dr_grpo").needs_max_response_length
    assert get_aggregation("prompt_mean").needs_groups
    assert not get_aggregation("token_mean_legacy").exact_global
