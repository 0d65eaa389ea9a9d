"""What a Megatron-Core GPT is made of: :class:`GPTSpec` (the architecture), its ``TransformerConfig`` at the
current parallel_state layout (:func:`get_transformer_config`, MoE fields included) and the transformer layer
spec (:func:`default_layer_spec`; :class:`SequenceParallelTorchNorm` and :func:`sequence_parallel_local_spec`
for MoE at TP > 1 on the local spec). Building the chunks: :mod:`megatron_rl_agg.mcore.build`.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_rl_agg.mcore import compat

__all__ = [
    "GPTSpec",
    "get_transformer_config",
    "default_layer_spec",
    "MOE_TOKEN_DISPATCHERS",
    "SequenceParallelTorchNorm",
    "needs_sequence_parallel",
    "sequence_parallel_local_spec",
]

# Megatron-Core token dispatchers this package runs (``moe_token_dispatcher_type``). "flex" needs
# DeepEP / HybridEP kernels (GPU only) and is not offered.
MOE_TOKEN_DISPATCHERS = ("alltoall", "allgather")


@dataclasses.dataclass(kw_only=True)
class GPTSpec:
    """Architecture of a small GPT built with Megatron-Core's ``GPTModel``."""

    num_layers: int
    """Transformer layers in the whole model (split over pp * vpp stages)."""
    hidden_size: int
    """Model width."""
    num_attention_heads: int
    """Attention heads (split over TP ranks)."""
    vocab_size: int
    """Vocabulary size; must be divisible by the TP size (no padding is added here)."""
    max_seq_length: int
    """Longest sequence the position embedding supports."""
    ffn_hidden_size: int | None = None
    """MLP width; None means 4 * hidden_size."""
    num_query_groups: int | None = None
    """Grouped-query attention groups; None means multi-head attention."""
    bf16: bool = False
    """bf16 parameters and activations (fp32 main gradients and optimizer state)."""
    tie_embeddings: bool = True
    """Share the input embedding and the output layer weight."""
    position_embedding_type: str = "rope"
    """Either "rope" or "learned_absolute"."""
    normalization: str = "LayerNorm"
    """Either "LayerNorm" or "RMSNorm"."""
    swiglu: bool = False
    """Gated SiLU MLP instead of GELU."""
    add_bias_linear: bool = True
    """Biases in the linear layers."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP; 0 keeps runs deterministic."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    init_method_std: float = 0.02
    """Std of the normal init; output projections use std / sqrt(2 * num_layers)."""
    variable_seq_lengths: bool = False
    """Let micro-batches of one forward-backward differ in padded length (pipeline stages then
    exchange shapes before every activation)."""
    num_experts: int | None = None
    """Experts per MoE layer (Megatron ``num_moe_experts``); None builds a dense model. Every MLP is
    then a Megatron ``MoELayer``: a learned top-k router and ``num_experts`` expert MLPs of width
    ``ffn_hidden_size``, split over the expert-parallel ranks."""
    moe_router_topk: int = 2
    """Experts each token is routed to (softmax over the router logits, then top-k)."""
    moe_token_dispatcher_type: str = "alltoall"
    """How tokens reach the experts of other EP ranks: "alltoall" (all-to-all of the routed tokens)
    or "allgather" (every rank gathers all tokens and keeps its experts' ones)."""
    moe_aux_loss_coeff: float = 0.0
    """Coefficient of the load-balancing auxiliary loss (Switch-Transformer / GShard ``aux_loss``:
    ``coeff * E / (k * T^2) * sum_e tokens_e * sum_t p_{t,e}`` per layer); 0 turns it off."""
    # Fields Hugging Face decoders need (megatron_rl_agg.hf sets them from config.json).
    add_qkv_bias: bool = False
    """Biases on the fused QKV projection only (Qwen2), with ``add_bias_linear=False``."""
    qk_layernorm: bool = False
    """Per-head norm of queries and keys before RoPE (Qwen3)."""
    kv_channels: int | None = None
    """Per-head width; None means hidden_size / num_attention_heads."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of every norm."""
    rotary_base: float = 10000.0
    """RoPE base (Hugging Face ``rope_theta``)."""
    rope_scaling_factor: float | None = None
    """Llama-3 rope scaling factor (Megatron's fixed low 1 / high 4 / original 8192), or None."""

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTSpec.{name}={getattr(self, name)} must be >= 1")
        if self.position_embedding_type not in ("rope", "learned_absolute"):
            raise ValueError(
                f"GPTSpec.position_embedding_type={self.position_embedding_type!r}; valid: "
                f"'rope', 'learned_absolute'"
            )
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"GPTSpec.normalization={self.normalization!r}; valid: 'LayerNorm', 'RMSNorm'")
        self._check_moe()

    def _check_moe(self) -> None:
        if self.moe_token_dispatcher_type not in MOE_TOKEN_DISPATCHERS:
            raise ValueError(f"GPTSpec.moe_token_dispatcher_type={self.moe_token_dispatcher_type!r}; valid: "
                             + ", ".join(repr(d) for d in MOE_TOKEN_DISPATCHERS))
        if self.moe_aux_loss_coeff < 0:
            raise ValueError(f"GPTSpec.moe_aux_loss_coeff={self.moe_aux_loss_coeff} must be >= 0")
        if self.num_experts is None:
            return
        if self.num_experts < 1:
            raise ValueError(f"GPTSpec.num_experts={self.num_experts} must be >= 1 (or None for a dense model)")
        if not 1 <= self.moe_router_topk <= self.num_experts:
            raise ValueError(f"GPTSpec.moe_router_topk={self.moe_router_topk} must be between 1 and "
                             f"num_experts={self.num_experts}")
        if self.variable_seq_lengths and self.moe_token_dispatcher_type != "alltoall":
            raise ValueError("GPTSpec.variable_seq_lengths=True needs moe_token_dispatcher_type='alltoall' "
                             f"(Megatron's {self.moe_token_dispatcher_type!r} dispatcher rejects variable "
                             "sequence lengths)")

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


def get_transformer_config(spec: GPTSpec, **overrides):
    """A ``TransformerConfig`` for ``spec`` at the current parallel_state layout.

    Settings that matter beyond the architecture:

    - ``pipeline_dtype`` = the parameter dtype (p2p receive buffers need it).
    - ``batch_p2p_comm=False`` under VPP: the interleaved schedule with batched isend/irecv gave
      silently wrong gradients (NVIDIA/Megatron-LM#1450); separate sends/receives are correct.
    - ``use_cpu_initialization`` in CPU mode (the GPU init path forks the CUDA RNG per TP rank).
    - ``moe_token_dispatcher_type="alltoall"`` with ``variable_seq_lengths`` (the default
      "allgather" dispatcher rejects variable lengths even in a dense model).
    - ``sequence_parallel=False``: Megatron's torch norm of the local (non-TE) spec rejects it. MoE
      models at TP > 1 need it; :func:`build_model` turns it on for them and swaps in
      :class:`SequenceParallelTorchNorm`.
    - MoE fields from ``spec`` (:func:`_moe_config`), with ``expert_model_parallel_size`` read from
      parallel_state.

    The training hooks (``no_sync_func``, ``finalize_model_grads_func``, ``grad_scale_func``) are
    attached by :func:`build_model` and :func:`build_optimizer`, which own the objects they call.

    Args:
        spec: architecture.
        **overrides: extra ``TransformerConfig`` fields (e.g. ``calculate_per_token_loss=True``).
    """
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    tp, pp, vpp, cp, ep = compat.parallel_sizes()
    if spec.vocab_size % tp != 0:
        raise ValueError(f"GPTSpec.vocab_size={spec.vocab_size} is not divisible by tp={tp}")
    stages = pp * (vpp or 1)
    if spec.num_layers % stages != 0:
        raise ValueError(
            f"GPTSpec.num_layers={spec.num_layers} is not divisible by pp*vpp={stages}; "
            f"each virtual stage needs the same number of layers"
        )
    kwargs = dict(
        **compat.transformer_config_defaults(),
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        ffn_hidden_size=spec.ffn_hidden_size,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        sequence_parallel=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=spec.params_dtype,
        pipeline_dtype=spec.params_dtype,
        bf16=spec.bf16,
        batch_p2p_comm=vpp is None,
        variable_seq_lengths=spec.variable_seq_lengths,
        hidden_dropout=spec.hidden_dropout,
        attention_dropout=spec.attention_dropout,
        init_method_std=spec.init_method_std,
        normalization=spec.normalization,
        add_bias_linear=spec.add_bias_linear,
        gated_linear_unit=spec.swiglu,
        activation_func=F.silu if spec.swiglu else F.gelu,
        add_qkv_bias=spec.add_qkv_bias,
        qk_layernorm=spec.qk_layernorm,
        kv_channels=spec.kv_channels,
        layernorm_epsilon=spec.layernorm_epsilon,
    )
    if spec.variable_seq_lengths:
        kwargs["moe_token_dispatcher_type"] = "alltoall"
    kwargs.update(_moe_config(spec, ep))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _moe_config(spec: GPTSpec, ep: int) -> dict:
    """The ``TransformerConfig`` fields of ``spec``'s MoE settings at expert-parallel size ``ep``.

    - ``expert_model_parallel_size=ep``; ``num_experts`` must be divisible by it (each EP rank holds
      ``num_experts / ep`` whole experts). Expert TP defaults to the model's TP (Megatron's default).
    - The aux loss uses Megatron's ``aux_loss`` load balancing (per-micro-batch statistics over the
      TP x CP group); with ``moe_aux_loss_coeff=0`` routing is left unbalanced ("none").
    - Dropless routing (no capacity factor), so every token reaches its top-k experts and the
      gradient does not depend on how rows are grouped into micro-batches through token dropping.
    ``moe_grouped_gemm`` follows the layer spec and is set by :func:`build_model`.
    """
    if spec.num_experts is None:
        if ep != 1:
            raise ValueError(f"expert_model_parallel_size={ep} needs an MoE model; set GPTSpec.num_experts")
        return {}
    if spec.num_experts % ep:
        raise ValueError(f"GPTSpec.num_experts={spec.num_experts} is not divisible by "
                         f"expert_model_parallel_size={ep}; each EP rank holds num_experts / EP experts")
    return dict(
        num_moe_experts=spec.num_experts,
        moe_router_topk=spec.moe_router_topk,
        moe_token_dispatcher_type=spec.moe_token_dispatcher_type,
        moe_aux_loss_coeff=spec.moe_aux_loss_coeff,
        moe_router_load_balancing_type="aux_loss" if spec.moe_aux_loss_coeff > 0 else "none",
        expert_model_parallel_size=ep,
    )


def _use_transformer_engine() -> bool:
    """True when CUDA is present and Transformer Engine imports (its layer spec is then the default)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


class SequenceParallelTorchNorm:
    """``torch.nn.LayerNorm`` / ``RMSNorm`` usable under sequence parallelism (local spec).

    Megatron's ``WrappedTorchNorm`` asserts ``sequence_parallel=False``. Under sequence parallelism
    a norm sees ``[s / tp, b, h]`` (its TP rank's part of the sequence) and its weight gradient is a
    partial sum over those positions; marking the parameters ``sequence_parallel=True`` is what
    Megatron's own norms do, and makes ``finalize_model_grads`` all-reduce (sum) them over the TP
    group, so the gradient is that of the whole sequence.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}.get(config.normalization)
        if norm_cls is None:
            raise ValueError(f"normalization={config.normalization!r}; valid: 'LayerNorm', 'RMSNorm'")
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


def needs_sequence_parallel(spec: GPTSpec, tp: int) -> bool:
    """MoE at TP > 1 trains only with sequence parallelism: Megatron's ``MoELayer`` raises in training
    mode otherwise (megatron-core 0.16). Dense models keep it off (identical numbers, one spec)."""
    return spec.num_experts is not None and tp > 1


def _uses_torch_norm(layer_spec) -> bool:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    sub = getattr(layer_spec, "submodules", None)
    return any(getattr(sub, name, None) is WrappedTorchNorm for name in ("input_layernorm", "pre_mlp_layernorm"))


def sequence_parallel_local_spec(layer_spec, num_layers_per_stage: int):
    """The local ``layer_spec`` as a block spec whose norms accept sequence parallelism.

    Replaces the layer's ``input_layernorm`` / ``pre_mlp_layernorm`` and the block's final norm by
    :class:`SequenceParallelTorchNorm`; ``GPTModel`` takes the returned ``TransformerBlockSubmodules``
    as its ``transformer_layer_spec`` (one layer spec per layer of this pipeline stage).
    """
    import copy

    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layer_spec = copy.deepcopy(layer_spec)
    sub = layer_spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(sub, name) is WrappedTorchNorm:
            setattr(sub, name, SequenceParallelTorchNorm)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers_per_stage,
                                      layer_norm=SequenceParallelTorchNorm)


def default_layer_spec(spec: GPTSpec):
    """Transformer Engine layer spec when TE imports and CUDA is present, else the local spec (with
    :class:`megatron_rl_agg.mcore.cp_attention.ContextParallelDotProductAttention` under context parallelism,
    which the local ``DotProductAttention`` refuses).

    With ``spec.num_experts`` the MLP is an ``MoELayer``: TE's grouped-GEMM experts on the TE path
    (GPU only, not run by this package's CPU tests), Megatron's ``SequentialMLP`` on the local one.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import gpt_layer_specs

    if _use_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=spec.num_experts, moe_grouped_gemm=spec.num_experts is not None,
            qk_layernorm=spec.qk_layernorm)
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_context_parallel_world_size() > 1:
        from megatron_rl_agg.mcore.cp_attention import cp_local_layer_spec

        return cp_local_layer_spec(num_experts=spec.num_experts, normalization=spec.normalization,
                                   qk_layernorm=spec.qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(num_experts=spec.num_experts,
                                                    normalization=spec.normalization,
                                                    qk_layernorm=spec.qk_layernorm)
