"""The local spec's context-parallel core attention in one process (CP = 1, real parallel_state): the
same values and gradients as Megatron's DotProductAttention, and clear errors for what it does not do.
Its CP > 1 path is covered by the multi-process gradient tests (tests/megatron/)."""

import pytest
import torch

from megatron_rl_agg.mcore import compat


@pytest.fixture(scope="module")
def config():
    compat.initialize_distributed()
    compat.initialize_model_parallel(tp=1, pp=1)
    from megatron_rl_agg.mcore.spec import GPTSpec, get_transformer_config
    yield get_transformer_config(GPTSpec(num_layers=1, hidden_size=32, num_attention_heads=4,
                                         num_query_groups=2, vocab_size=16, max_seq_length=8))
    compat.destroy_model_parallel()


def _qkv(seed=0, s=8, b=3, heads=4, groups=2, d=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, heads, d, generator=g).requires_grad_(True),
            torch.randn(s, b, groups, d, generator=g).requires_grad_(True),
            torch.randn(s, b, groups, d, generator=g).requires_grad_(True))


def test_matches_dot_product_attention_at_cp1(config):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_rl_agg.mcore.cp_attention import ContextParallelDotProductAttention

    ours = ContextParallelDotProductAttention(config, 1, AttnMaskType.causal, "self")
    stock = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    q, k, v = _qkv()
    w = torch.randn(8, 3, 32, generator=torch.Generator().manual_seed(1))
    out = ours(q, k, v, None)
    (out * w).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = _qkv()
    ref = stock(q2, k2, v2, None)
    (ref * w).sum().backward()
    assert out.shape == ref.shape == (8, 3, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # causal: the first position attends to itself only, so it equals its (group's) value row
    torch.testing.assert_close(out[0].view(3, 4, 8)[:, 0], v[0, :, 0].detach(), rtol=1e-6, atol=1e-6)


def test_refusals_name_the_alternative(config):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_rl_agg.mcore.cp_attention import ContextParallelDotProductAttention

    attn = ContextParallelDotProductAttention(config, 1, AttnMaskType.causal, "self")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"packed \(THD\) sequences are not supported.*--sequence-packing"):
        attn(q, k, v, None, packed_seq_params=object())
    with pytest.raises(ValueError, match="takes no attention_mask"):
        attn(q, k, v, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal only"):
        ContextParallelDotProductAttention(config, 1, AttnMaskType.padding, "self")


def test_cp_local_layer_spec_swaps_only_the_core_attention():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_rl_agg.mcore.cp_attention import ContextParallelDotProductAttention, cp_local_layer_spec

    spec, stock = cp_local_layer_spec(), get_gpt_layer_local_spec()
    assert spec.submodules.self_attention.submodules.core_attention is ContextParallelDotProductAttention
    assert stock.submodules.self_attention.submodules.core_attention is not ContextParallelDotProductAttention
    # megatron-core 0.19 spells the MLP as a functools.partial, which compares by identity (a deep
    # copy is a new object); its repr names the function and every keyword, so compare those.
    assert repr(spec.submodules.mlp) == repr(stock.submodules.mlp)
