"""Single-process tests of sequence packing: layout arithmetic, pack/unpack, the block-diagonal mask,
and the packed attention against a brute-force per-row attention."""

import argparse

import pytest
import torch

from megatron_rl_agg.core import aggregation
from megatron_rl_agg.parallel.weights import token_weights
from megatron_rl_agg.mcore import compat
from megatron_rl_agg.mcore.packed_attention import block_causal_mask
from megatron_rl_agg.mcore.packing import (
    add_sequence_packing_args,
    lengths_from_loss_mask,
    lengths_from_mask,
    make_layout,
    pack,
    pack_micro_batch,
    packed_seq_params,
    unpack,
)


def _padded_batch(lengths, width, seed=0):
    """Random right-padded micro-batch with loss tokens only inside each row."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    real = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    tokens = torch.randint(1, 50, (b, width), generator=g) * real
    loss_mask = (torch.rand(b, width, generator=g) < 0.7).float() * real
    return {
        "tokens": tokens,
        "labels": torch.randint(1, 50, (b, width), generator=g) * real,
        "loss_mask": loss_mask,
        "advantages": torch.randn(b, width, generator=g, dtype=torch.float64) * real,
    }


def test_layout_hand_example():
    # rows of 2, 3 and 1 tokens in width 4: cu_seqlens = [0, 2, 5, 6], row 1 starts at packed 2.
    lay = make_layout(torch.tensor([2, 3, 1]), 4)
    assert lay.cu_seqlens.tolist() == [0, 2, 5, 6]
    assert lay.cu_seqlens.dtype == torch.int32
    # padded flat index b*4 + j: row0 -> 0,1; row1 -> 4,5,6; row2 -> 8
    assert lay.index.tolist() == [0, 1, 4, 5, 6, 8]
    assert (lay.max_seqlen, lay.total_length) == (3, 6)


def test_layout_filler_segment():
    # 6 real tokens padded to a multiple of 4 -> T = 8 with a filler segment of 2.
    lay = make_layout(torch.tensor([2, 3, 1]), 4, pad_to_multiple_of=4)
    assert lay.cu_seqlens.tolist() == [0, 2, 5, 6, 8]
    assert (lay.total_length, lay.num_real_tokens, lay.num_rows) == (8, 6, 3)
    x = torch.arange(1, 13).reshape(3, 4)
    assert pack(x, lay).tolist() == [[1, 2, 5, 6, 7, 9, 0, 0]]


def test_layout_fixed_total_length():
    # 6 real tokens padded to exactly 10: one filler segment of 4
    lay = make_layout(torch.tensor([2, 3, 1]), 4, total_length=10)
    assert lay.cu_seqlens.tolist() == [0, 2, 5, 6, 10] and lay.max_seqlen == 4
    with pytest.raises(ValueError, match="total_length=5 must be >= 6"):
        make_layout(torch.tensor([2, 3, 1]), 4, total_length=5)
    with pytest.raises(ValueError, match="total_length=10 must be >= 8"):
        make_layout(torch.tensor([2, 3, 1]), 4, pad_to_multiple_of=4, total_length=10)


def test_pack_unpack_roundtrip_and_gradient():
    lengths = [5, 1, 7, 3]
    lay = make_layout(torch.tensor(lengths), 7, pad_to_multiple_of=3)
    x = torch.randn(4, 7, 2, requires_grad=True)
    real = (torch.arange(7).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).unsqueeze(-1)
    back = unpack(pack(x, lay), lay, fill=-1.0)
    torch.testing.assert_close(back, torch.where(real, x, torch.full_like(x, -1.0)), rtol=0, atol=0)
    back.sum().backward()
    # padding entries never reach the packed tensor, so their gradient is exactly 0
    torch.testing.assert_close(x.grad, real.expand_as(x).float(), rtol=0, atol=0)


def test_position_ids_restart_per_row_and_filler():
    batch = _padded_batch([3, 1, 2], 4)
    packed, _ = pack_micro_batch(batch, torch.tensor([3, 1, 2]), pad_to_multiple_of=4)
    # T = 6 -> 8: rows [0,1,2], [0], [0,1], filler [0,0]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 0, 0]]
    assert packed["attention_mask"] is None
    params = packed["packed_seq_params"]
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 3, 4, 6, 8]
    assert params.max_seqlen_q == params.max_seqlen_kv == 3
    assert packed["loss_mask"][0, 6:].sum() == 0


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "prompt_mean", "token_sum"])
def test_packed_weights_give_the_same_weighted_sum(mode):
    """The per-row aggregation weights, packed, give the same sum(w * values) as the padded layout."""
    lengths = [6, 2, 5, 3]
    batch = _padded_batch(lengths, 6, seed=1)
    batch["weights"] = token_weights(batch["loss_mask"], mode, group_sizes=[2, 2])
    values = torch.randn(4, 6, dtype=torch.float64)
    padded = (batch["weights"] * values).sum()
    reference = aggregation.aggregate(values, batch["loss_mask"], mode, group_sizes=[2, 2])
    packed, lay = pack_micro_batch(batch, torch.tensor(lengths), pad_to_multiple_of=4)
    packed_sum = (packed["weights"] * pack(values, lay)).sum()
    torch.testing.assert_close(packed_sum, padded, rtol=1e-12, atol=0)
    # the reference keeps the float32 mask's precision (1/|o_i| rounded in float32)
    torch.testing.assert_close(packed_sum, reference, rtol=1e-6, atol=0)
    assert packed["advantages"].dtype == torch.float64


def test_per_row_values_follow_their_row():
    # advantages [B] = [10, 20, 30]: every packed token of row b carries row b's value
    batch = _padded_batch([2, 3, 1], 3)
    batch["advantages"] = torch.tensor([10.0, 20.0, 30.0])
    packed, _ = pack_micro_batch(batch, torch.tensor([2, 3, 1]))
    assert packed["advantages"].tolist() == [[10.0, 10.0, 20.0, 20.0, 20.0, 30.0]]
    assert packed["tokens"].tolist() == [batch["tokens"][0, :2].tolist() + batch["tokens"][1].tolist()
                                         + batch["tokens"][2, :1].tolist()]


def test_lengths_from_mask_and_its_errors():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    assert lengths_from_mask(mask).tolist() == [2, 3, 1]
    with pytest.raises(ValueError, match=r"rows \[1\] are not right-padded"):
        lengths_from_mask(torch.tensor([[1, 0, 0], [0, 1, 1]]))


def test_lengths_from_loss_mask():
    # last loss token at column 2 -> 3; none -> 1 (a padding row keeps one token); column 3 -> 4
    m = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1.0]])
    assert lengths_from_loss_mask(m).tolist() == [3, 1, 4]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"rows \[1\] have lengths \[0\]"):
        make_layout(torch.tensor([2, 0]), 4)
    with pytest.raises(ValueError, match=r"must lie in \[1, 4\]"):
        make_layout(torch.tensor([5]), 4)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive int, got 0"):
        make_layout(torch.tensor([1]), 4, pad_to_multiple_of=0)
    lay = make_layout(torch.tensor([2, 1]), 3)
    with pytest.raises(ValueError, match=r"expected a \[2, 3, \.\.\.\] tensor"):
        pack(torch.zeros(2, 4), lay)
    with pytest.raises(ValueError, match=r"expected a packed \[1, 3, \.\.\.\] tensor"):
        unpack(torch.zeros(1, 4), lay)
    batch = _padded_batch([2, 1], 3)
    batch["loss_mask"][1, 2] = 1.0  # a loss token beyond row 1's length
    beyond = r"is nonzero beyond the row length in rows "
    with pytest.raises(ValueError, match=r"batch\['loss_mask'\] " + beyond + r"\[1\]"):
        pack_micro_batch(batch, torch.tensor([2, 1]))
    batch = _padded_batch([2, 1], 3)
    batch["pg_weights"] = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"batch\['pg_weights'\] " + beyond + r"\[0, 1\]"):
        pack_micro_batch(batch, torch.tensor([2, 1]))
    batch = _padded_batch([2, 1], 3)
    batch["attention_mask"] = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs attention_mask=None"):
        pack_micro_batch(batch, torch.tensor([2, 1]))


def test_block_causal_mask_matches_brute_force():
    cu = torch.tensor([0, 3, 4, 7], dtype=torch.int32)
    forbidden = block_causal_mask(cu, 7)
    seg = [0, 0, 0, 1, 2, 2, 2]
    for i in range(7):
        for j in range(7):
            assert bool(forbidden[i, j]) == (not (seg[i] == seg[j] and j <= i)), (i, j)
    with pytest.raises(ValueError, match="cu_seqlens ends at 7 but the packed sequence has 8 tokens"):
        block_causal_mask(cu, 8)


def test_packed_seq_params_shares_boundaries():
    lay = make_layout(torch.tensor([4, 2]), 4)
    p = packed_seq_params(lay)
    assert p.cu_seqlens_q is p.cu_seqlens_kv and p.cu_seqlens_q.tolist() == [0, 4, 6]


def test_sequence_packing_flags():
    parser = add_sequence_packing_args(argparse.ArgumentParser())
    args = parser.parse_args(["--sequence-packing", "--pack-pad-to-multiple-of", "2"])
    assert args.sequence_packing is True and args.pack_pad_to_multiple_of == 2
    assert parser.parse_args([]).sequence_packing is False


@pytest.fixture(scope="module")
def megatron_single_rank():
    """Real Megatron parallel state on one CPU rank (gloo), torn down after the module."""
    import torch.distributed as torch_dist

    from megatron_rl_agg.mcore import compat

    created = not torch_dist.is_initialized()
    compat.initialize_distributed()
    compat.initialize_model_parallel(tp=1, pp=1, seed=7)
    yield
    compat.destroy_model_parallel()
    if created:
        torch_dist.destroy_process_group()


def _brute_force_attention(q, k, v, scale):
    """Plain causal softmax attention of ONE row: q [s, np, hn], k/v [s, np, hn] -> [s, np*hn]."""
    s = q.shape[0]
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return torch.einsum("hij,jhd->ihd", probs, v).reshape(s, -1)


@pytest.mark.parametrize("pad_to_multiple_of", [1, 8])
def test_packed_attention_equals_padded_and_per_row(megatron_single_rank, pad_to_multiple_of):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_rl_agg.mcore.packed_attention import PackedDotProductAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True,
                            **compat.transformer_config_defaults())
    attn = PackedDotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    lengths, width, hn = [5, 2, 7, 1], 7, 8
    g = torch.Generator().manual_seed(3)
    # padded layout [S, B, heads, hn] as Megatron's Attention hands it over (GQA: 2 kv groups)
    q = torch.randn(width, 4, 4, hn, generator=g, requires_grad=True)
    k = torch.randn(width, 4, 2, hn, generator=g, requires_grad=True)
    v = torch.randn(width, 4, 2, hn, generator=g, requires_grad=True)
    padded = attn(q, k, v, None)  # parent class path: [S, B, np*hn], causal mask
    lay = make_layout(torch.tensor(lengths), width, pad_to_multiple_of=pad_to_multiple_of)
    # pack works on [B, S, ...]; Attention squeezes the b=1 dim before core attention: [T, heads, hn]
    qp, kp, vp = (pack(x.transpose(0, 1), lay)[0] for x in (q, k, v))
    packed = attn(qp, kp, vp, None, packed_seq_params=packed_seq_params(lay))
    assert packed.shape == (lay.total_length, 32)
    back = unpack(packed.unsqueeze(0), lay)  # [B, S, np*hn]
    real = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    torch.testing.assert_close(back[real], padded.transpose(0, 1)[real], rtol=1e-6, atol=1e-6)
    for b, n in enumerate(lengths):  # independent reference: one row at a time, kv heads repeated
        ref = _brute_force_attention(q[:n, b], k[:n, b].repeat_interleave(2, 1),
                                     v[:n, b].repeat_interleave(2, 1), attn.softmax_scale)
        torch.testing.assert_close(back[b, :n], ref, rtol=1e-6, atol=1e-6)
    # gradients w.r.t. q, k, v through the real tokens agree between the two layouts
    cot = torch.randn(4, width, 32, generator=g) * real.unsqueeze(-1)
    grads_padded = torch.autograd.grad((padded.transpose(0, 1) * cot).sum(), (q, k, v))
    grads_packed = torch.autograd.grad((back * cot).sum(), (q, k, v))
    for gp, gq in zip(grads_packed, grads_padded):
        torch.testing.assert_close(gp, gq, rtol=1e-6, atol=1e-6)


def test_packed_attention_rejects_bad_params(megatron_single_rank):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_rl_agg.mcore.packed_attention import PackedDotProductAttention, packed_local_layer_spec

    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                            attention_dropout=0.0, use_cpu_initialization=True,
                            **compat.transformer_config_defaults())
    attn = PackedDotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    x = torch.randn(4, 2, 8)
    cu = torch.tensor([0, 1, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="qkv_format must be 'thd', got 'sbhd'"):
        attn(x, x, x, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu,
                                                               cu_seqlens_kv=cu))
    other = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q == cu_seqlens_kv"):
        attn(x, x, x, None, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu,
                                                               cu_seqlens_kv=other))
    with pytest.raises(ValueError, match="attention_mask=None"):
        attn(x, x, x, torch.zeros(1, 1, 4, 4, dtype=torch.bool),
             packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu))
    spec = packed_local_layer_spec()
    assert spec.submodules.self_attention.submodules.core_attention is PackedDotProductAttention
    with pytest.raises(ValueError, match="multi_latent_attention"):
        packed_local_layer_spec(multi_latent_attention=True)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "prompt_mean"])
def test_packed_loss_func_equals_padded(megatron_single_rank, mode):
    """megatron_loss.loss_func, unchanged, on packed micro-batches: same loss, report and logit grads."""
    from megatron_rl_agg.core.config import LossConfig
    from megatron_rl_agg.mcore.batch import prepare_microbatches
    from megatron_rl_agg.mcore.loss import loss_func
    from megatron_rl_agg.mcore.packing import pack_microbatches

    g = torch.Generator().manual_seed(11)
    n, width, vocab = 6, 8, 16
    lengths = torch.tensor([8, 3, 6, 1, 5, 8])
    real = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    loss_mask = (real & (torch.arange(width) >= 1)).float()
    loss_mask[3] = 0.0  # a fully masked row
    loss_mask[4, 4] = 0.0  # a hole; the row's last loss token is at column 3
    batch = {
        "tokens": torch.randint(1, vocab, (n, width), generator=g) * real,
        "labels": torch.randint(1, vocab, (n, width), generator=g) * real,
        "loss_mask": loss_mask,
        "advantages": torch.randn(n, generator=g, dtype=torch.float64),  # per row: broadcast by packing
        "old_logprobs": -torch.rand(n, width, generator=g) * loss_mask,
        "ref_logprobs": -torch.rand(n, width, generator=g) * loss_mask,
        "group_ids": torch.tensor([0, 0, 1, 1, 2, 2]),
    }
    cfg = LossConfig(loss_aggregation=mode, kl_coef=0.1, entropy_coef=0.01, kl_aggregation=mode)
    padded = prepare_microbatches(batch, cfg, micro_batch_size=3)
    packed = pack_microbatches(padded, pad_to_multiple_of=4)
    logits = torch.randn(n, width, vocab, generator=g)
    for k, (mb, pmb) in enumerate(zip(padded, packed)):
        rows = logits[3 * k:3 * k + 3]
        a = rows.clone().requires_grad_(True)
        b = pack(rows, pmb["packed_layout"]).requires_grad_(True)
        loss_a, report_a = loss_func(a.clone(), micro_batch=mb, loss_config=cfg)
        loss_b, report_b = loss_func(b.clone(), micro_batch=pmb, loss_config=cfg)
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
        assert report_a.keys() == report_b.keys()
        for key in report_a:
            torch.testing.assert_close(report_b[key], report_a[key], rtol=1e-6, atol=1e-12, msg=key)
        loss_a.backward()
        loss_b.backward()
        # logit gradients: equal on the kept tokens, exactly 0 on the trimmed tail of the padded rows
        kept = torch.arange(width).unsqueeze(0) < pmb["packed_layout"].lengths.unsqueeze(1)
        back = unpack(b.grad, pmb["packed_layout"])
        torch.testing.assert_close(back, a.grad * kept.unsqueeze(-1), rtol=1e-6, atol=1e-9)
        assert torch.all(a.grad[~kept] == 0)
    # equal_length: both packs padded to the longer one; only filler is added
    same = pack_microbatches(padded, pad_to_multiple_of=4, equal_length=True)
    lengths = [p["tokens"].shape[1] for p in packed]
    assert [p["tokens"].shape[1] for p in same] == [max(lengths)] * 2
    assert all(p["packed_fixed_length"] == max(lengths) for p in same)
    for p, q in zip(same, packed):
        n = q["tokens"].shape[1]
        assert torch.equal(p["tokens"][:, :n], q["tokens"]) and p["loss_mask"][:, n:].sum() == 0


def test_packed_forward_step_refuses_unequal_packs_under_pp(megatron_single_rank):
    """The check runs before the model: a module carrying a real PP2 TransformerConfig suffices."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_rl_agg.mcore.packing import packed_forward_step

    class Holder(torch.nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            self.config = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2,
                                            pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
                                            **compat.transformer_config_defaults(), **kwargs)

    packed, _ = pack_micro_batch(_padded_batch([2, 1], 3), torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="equal_length=True\\) or set variable_seq_lengths=True"):
        packed_forward_step(iter([packed]), Holder())
    with pytest.raises(ValueError, match=r"virtual pipeline stages \(vpp=2\) needs packs of one length"):
        packed_forward_step(iter([packed]), Holder(virtual_pipeline_model_parallel_size=2,
                                                   variable_seq_lengths=True,
                                                   moe_token_dispatcher_type="alltoall"))
    with pytest.raises(ValueError, match="without 'packed_seq_params'"):
        packed_forward_step(iter([_padded_batch([2, 1], 3)]), Holder())


def test_micro_batch_prepared_for_context_parallelism_is_refused():
    batch = {"tokens": torch.ones(2, 4, dtype=torch.int64), "loss_mask": torch.ones(2, 4), "cp_size": 2}
    with pytest.raises(ValueError, match=r"context parallelism \(cp_size=2\).*context_parallel_size=1"):
        pack_micro_batch(batch, torch.tensor([4, 4]))
