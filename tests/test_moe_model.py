"""MoE and expert-parallel settings of ``mcore/spec.py`` / ``mcore/build.py`` / ``mcore/compat.py`` in one
process: the layout factor ``ep``, the GPTSpec checks, the TransformerConfig fields, and the CPU-mode
redirects MoE needs.

Multi-process gradients at EP layouts: tests/megatron/test_moe_grads.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rl_agg.mcore import build, compat, spec, weights
from megatron_rl_agg.mcore.spec import GPTSpec
from megatron_rl_agg.parallel.layout import Layout, parse_layout


def moe_spec(**overrides) -> GPTSpec:
    kwargs = dict(num_layers=2, hidden_size=16, num_attention_heads=2, vocab_size=32, max_seq_length=8,
                  add_bias_linear=False, num_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.01)
    kwargs.update(overrides)
    return GPTSpec(**kwargs)


@pytest.mark.parametrize("text,expected,world,dp_size", [
    ("ep2", Layout(ep=2), 2, 2),
    ("dp2+ep2", Layout(dp=2, ep=2), 4, 4),
    ("tp2+ep2+m2", Layout(tp=2, ep=2, num_microbatches=2), 4, 2),
    ("pp2+ep2+m4", Layout(pp=2, ep=2, num_microbatches=4), 4, 2),
])
def test_ep_factor_multiplies_the_process_count(text, expected, world, dp_size):
    layout = parse_layout(text)
    assert layout == expected
    assert (layout.world_size, layout.data_parallel_size) == (world, dp_size)
    assert parse_layout(str(layout)) == layout
    assert "ep" not in str(parse_layout("dp2"))     # dense layouts print as before


def test_ep_factor_rejects():
    with pytest.raises(ValueError, match="Layout.ep=0 must be >= 1"):
        parse_layout("ep0")
    with pytest.raises(ValueError, match="sets ep more than once"):
        parse_layout("ep2+ep2")


@pytest.mark.parametrize("overrides,message", [
    (dict(moe_token_dispatcher_type="flex"),
     "moe_token_dispatcher_type='flex'; valid: 'alltoall', 'allgather'"),
    (dict(moe_router_topk=5), "moe_router_topk=5 must be between 1 and num_experts=4"),
    (dict(moe_router_topk=0), "moe_router_topk=0 must be between 1 and num_experts=4"),
    (dict(num_experts=0), "num_experts=0 must be >= 1"),
    (dict(moe_aux_loss_coeff=-0.1), "moe_aux_loss_coeff=-0.1 must be >= 0"),
    (dict(variable_seq_lengths=True, moe_token_dispatcher_type="allgather"),
     "variable_seq_lengths=True needs moe_token_dispatcher_type='alltoall'"),
])
def test_gpt_spec_moe_errors(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        moe_spec(**overrides)


def test_moe_config_fields_and_expert_divisibility():
    fields = spec._moe_config(moe_spec(), ep=2)
    assert fields == dict(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                          moe_aux_loss_coeff=0.01, moe_router_load_balancing_type="aux_loss",
                          expert_model_parallel_size=2)
    # Aux loss off: no load balancing at all (Megatron's default type would still be "aux_loss").
    assert spec._moe_config(moe_spec(moe_aux_loss_coeff=0.0), ep=1)["moe_router_load_balancing_type"] == "none"
    with pytest.raises(ValueError, match="num_experts=4 is not divisible by expert_model_parallel_size=3"):
        spec._moe_config(moe_spec(), ep=3)
    dense = GPTSpec(num_layers=2, hidden_size=16, num_attention_heads=2, vocab_size=32, max_seq_length=8)
    assert spec._moe_config(dense, ep=1) == {}
    with pytest.raises(ValueError, match="expert_model_parallel_size=2 needs an MoE model"):
        spec._moe_config(dense, ep=2)


def test_sequence_parallel_only_for_moe_at_tp_above_one():
    assert spec.needs_sequence_parallel(moe_spec(), tp=2)
    assert not spec.needs_sequence_parallel(moe_spec(), tp=1)
    dense = GPTSpec(num_layers=2, hidden_size=16, num_attention_heads=2, vocab_size=32, max_seq_length=8)
    assert not spec.needs_sequence_parallel(dense, tp=2)


@pytest.fixture(scope="module")
def world_of_one():
    compat.initialize_distributed()
    compat.initialize_model_parallel(tp=1, pp=1)
    yield
    compat.destroy_model_parallel()


def test_expert_parallel_size_must_divide_the_data_parallel_size(world_of_one):
    with pytest.raises(ValueError, match="expert_model_parallel_size=2 does not fit world size 1"):
        compat.initialize_model_parallel(tp=1, pp=1, ep=2)


def test_moe_with_bias_on_the_local_spec_is_refused_before_building(world_of_one):
    compat.initialize_model_parallel(tp=1, pp=1)
    with pytest.raises(ValueError, match="add_bias_linear=True with MoE experts of the local spec"):
        build.build_model(moe_spec(add_bias_linear=True))


def test_cpu_mode_moe_redirects(world_of_one):
    """The redirects exist only in CPU mode and keep Megatron's own semantics."""
    if torch.cuda.is_available():
        pytest.skip("CPU mode is off where CUDA is present")
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    assert moe_utils.te_general_gemm is None          # Megatron's torch.mm router path
    stream = torch.cuda.Stream()
    assert torch.cuda.current_stream() is not None
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pass
    stream.record_event().synchronize()
    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert splits.tolist() == [3, 1] and not torch.is_tensor(splits)
    counts = torch.tensor([2, 2])
    assert token_dispatcher.maybe_move_tensor_to_cpu(counts) is counts


def test_moe_model_builds_on_the_local_spec_and_routes(world_of_one):
    """One process, both dispatchers: SequentialMLP experts, a top-2 router, the aux loss tracked."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    compat.initialize_model_parallel(tp=1, pp=1, seed=3)
    for dispatcher in ("alltoall", "allgather"):
        (chunk,) = build.build_model(moe_spec(moe_token_dispatcher_type=dispatcher), wrap_ddp=False)
        weights.init_weights([chunk], seed=3)
        gpt = build.unwrap(chunk)
        experts = gpt.decoder.layers[0].mlp.experts
        assert isinstance(experts, SequentialMLP) and len(experts.local_experts) == 4
        assert not gpt.config.moe_grouped_gemm and gpt.config.moe_router_topk == 2
        tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
        logits = chunk(tokens, torch.arange(8).expand(2, 8), None)
        assert logits.shape == (2, 8, 32) and torch.isfinite(logits).all()
        logits.float().pow(2).mean().backward()
        assert gpt.decoder.layers[0].mlp.router.weight.grad.abs().max() > 0
        values = compat.moe_metric_per_layer("load_balancing_loss")     # read, then zeroed
        assert values.shape == (2,) and values.gt(0).all()                        # one value per layer
        assert compat.moe_metric_per_layer("load_balancing_loss").eq(0).all()


def _config(**overrides):
    from megatron.core.transformer import TransformerConfig

    from megatron_rl_agg.mcore.compat import transformer_config_defaults

    kwargs = dict(**transformer_config_defaults(), num_layers=2, hidden_size=16, num_attention_heads=2, num_moe_experts=4, moe_router_topk=2,
                  moe_aux_loss_coeff=0.01, add_bias_linear=False, calculate_per_token_loss=True,
                  use_cpu_initialization=True)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def test_per_token_loss_with_moe_aux_loss_at_tp2_is_refused_where_the_router_lacks_the_fix(world_of_one):
    """NVIDIA/Megatron-LM#5047: measured 0.5x aux gradient at TP2 under the flag on megatron-core 0.16.1,
    exact on 0.19.2 (test_moe_grads.py measures both); the combination is refused only where unfixed."""
    import megatron.core

    from megatron_rl_agg.mcore.setup_checks import _router_scales_aux_by_tp_cp, check_moe_setup

    fixed = _router_scales_aux_by_tp_cp()
    known = {"0.16.1": False, "0.19.2": True}      # the two releases the suite runs on
    if megatron.core.__version__ in known:
        assert fixed is known[megatron.core.__version__], megatron.core.__version__
    if fixed:
        check_moe_setup(_config(tensor_model_parallel_size=2, sequence_parallel=True))
    else:
        with pytest.raises(ValueError, match=r"TP x CP = 2 > 1.*2x too small \(NVIDIA/Megatron-LM#5047"):
            check_moe_setup(_config(tensor_model_parallel_size=2, sequence_parallel=True))
    check_moe_setup(_config())                                    # TP1: exact, allowed
    check_moe_setup(_config(tensor_model_parallel_size=2, sequence_parallel=True, moe_aux_loss_coeff=0.0))
    check_moe_setup(_config(tensor_model_parallel_size=2, sequence_parallel=True,
                            calculate_per_token_loss=False))
