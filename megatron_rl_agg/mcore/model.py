"""Build a Megatron-Core GPT model (dense or MoE) at any TP/PP/VPP/DP/EP layout, with layout-independent
weights.

Typical use (every rank, after :func:`compat.initialize_distributed`)::

    layout = parse_layout("pp2,vpp2,m4")
    initialize_model_parallel(layout.tp, layout.pp, layout.vpp, seed=1)
    chunks = build_model(spec)                 # one DDP-wrapped GPTModel per virtual stage
    init_weights(chunks, seed=1)               # same full weights at every layout
    optimizer = build_optimizer(chunks, lr=1e-5)
    for c in chunks: c.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=..., model=chunks,
                                num_microbatches=layout.num_microbatches, ...)
    grads = gather_full_grads(chunks)          # {global key: full fp32 gradient} on every rank

The global key of a parameter is its Megatron dist-checkpointing key; transformer layers are stacked
along a leading layer axis, so ``grads["decoder.layers.mlp.linear_fc1.weight"]`` is
``[num_layers, ffn, hidden]`` whatever the layout. That makes gradients and weights from different
layouts directly comparable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Callable

import torch

from megatron_rl_agg.mcore import compat, cpu_mode

__all__ = [
    "Layout",
    "parse_layout",
    "GPTSpec",
    "get_transformer_config",
    "default_layer_spec",
    "build_model",
    "unwrap",
    "init_weights",
    "build_optimizer",
    "gather_full_grads",
    "gather_full_params",
    "MOE_TOKEN_DISPATCHERS",
    "SequenceParallelTorchNorm",
    "needs_sequence_parallel",
    "sequence_parallel_local_spec",
]

_LAYOUT_KEYS = {"tp": "tp", "pp": "pp", "vpp": "vpp", "cp": "cp", "dp": "dp", "ep": "ep",
                "m": "num_microbatches"}

# Megatron-Core token dispatchers this package runs (``moe_token_dispatcher_type``). "flex" needs
# DeepEP / HybridEP kernels (GPU only) and is not offered.
MOE_TOKEN_DISPATCHERS = ("alltoall", "allgather")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    """A parallel layout and micro-batch count for one forward-backward over a mini-batch."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B), or None."""
    cp: int = 1
    """Context-parallel size (each row split into 2 * cp zigzag chunks over cp ranks)."""
    dp: int = 1
    """Data-parallel size (without context parallelism) besides expert parallelism: with ``ep=1``
    Megatron's data-parallel size; with ``ep > 1`` each expert's replicas (its expert-data-parallel
    group holds ``dp * cp`` ranks)."""
    ep: int = 1
    """Expert-parallel size (``expert_model_parallel_size``). The factors multiply like the others:
    the layout needs ``tp * pp * cp * dp * ep`` processes and Megatron's data-parallel size (the ``D``
    of the loss, over which the dense weights' gradients are reduced) is ``dp * ep``; each expert
    lives on one EP rank and is replicated over the ``dp * cp`` expert-data-parallel ranks."""
    num_microbatches: int = 1
    """Micro-batches per data-parallel rank and optimizer step."""

    def __post_init__(self):
        for name in ("tp", "pp", "cp", "dp", "ep", "num_microbatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"Layout.{name}={getattr(self, name)} must be >= 1")
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            raise ValueError(f"Layout vpp={self.vpp} needs vpp >= 2 and pp >= 2 (pp={self.pp})")

    @property
    def world_size(self) -> int:
        """Processes the layout needs: ``tp * pp * cp * dp * ep``."""
        return self.tp * self.pp * self.cp * self.dp * self.ep

    @property
    def data_parallel_size(self) -> int:
        """Megatron's data-parallel size ``dp * ep`` (without CP): the ranks that split a mini-batch's rows."""
        return self.dp * self.ep

    def __str__(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        if self.vpp is not None:
            parts.append(f"vpp{self.vpp}")
        if self.cp != 1:
            parts.append(f"cp{self.cp}")
        parts.append(f"dp{self.dp}")
        if self.ep != 1:
            parts.append(f"ep{self.ep}")
        parts.append(f"m{self.num_microbatches}")
        return ",".join(parts)


def parse_layout(text: str) -> Layout:
    """Parse ``"dp2,m2"``, ``"tp2"``, ``"pp2,vpp2,m4"`` ... into a :class:`Layout`.

    Comma-separated ``<key><int>`` items, keys ``tp``, ``pp``, ``vpp``, ``cp``, ``dp``, ``ep``, ``m``
    (micro-batches),
    each at most once, case-insensitive; omitted keys take the :class:`Layout` defaults.
    """
    values = {}
    for item in text.strip().lower().split(","):
        item = item.strip()
        match = re.fullmatch(r"([a-z]+)(\d+)", item)
        if match is None or match.group(1) not in _LAYOUT_KEYS:
            raise ValueError(
                f"bad layout item {item!r} in {text!r}: expected <key><int> with key one of "
                f"{sorted(_LAYOUT_KEYS)}, e.g. 'tp2,pp2,vpp2,dp1,m4'"
            )
        field = _LAYOUT_KEYS[match.group(1)]
        if field in values:
            raise ValueError(f"layout {text!r} sets {match.group(1)!r} twice")
        values[field] = int(match.group(2))
    return Layout(**values)


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


def _parallel_sizes() -> tuple[int, int, int | None, int, int]:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "Megatron model-parallel state is not initialised; call "
            "compat.initialize_model_parallel(tp, pp, vpp) first"
        )
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        parallel_state.get_context_parallel_world_size(),
        parallel_state.get_expert_model_parallel_world_size(),
    )


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

    tp, pp, vpp, cp, ep = _parallel_sizes()
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


def build_model(spec: GPTSpec, *, wrap_ddp: bool = True, layer_spec=None, ddp_config=None,
                **config_overrides) -> list:
    """Build this rank's model chunks, one per virtual pipeline stage.

    Mirrors Megatron-LM's ``get_model`` + ``setup_model_and_optimizer``: chunk ``i`` is a
    ``GPTModel(vp_stage=i)`` whose ``pre_process``/``post_process`` say whether it holds the
    embedding / output layer; each chunk is wrapped in Megatron DDP (gradient averaging over DP,
    the default; buckets only on chunk 0 as Megatron-LM does) and the shared config gets
    ``no_sync_func`` (one per chunk) and ``finalize_model_grads_func`` so the schedules from
    ``get_forward_backward_func()`` accumulate micro-batches and reduce gradients once per step.

    Weights come from Megatron's own init; call :func:`init_weights` for layout-independent ones.

    Args:
        spec: architecture.
        wrap_ddp: wrap each chunk in Megatron DDP (needed for ``finalize_model_grads`` and the
            optimizer). False returns bare ``GPTModel`` chunks and attaches no hooks.
        layer_spec: a ``ModuleSpec`` for the transformer layer (e.g. a THD-capable attention
            spec); default :func:`default_layer_spec`.
        ddp_config: a ``DistributedDataParallelConfig``; default: fp32 gradient reduction, no
            overlap, no distributed optimizer.
        **config_overrides: forwarded to :func:`get_transformer_config`.

    Returns:
        ``list`` of chunks (length ``vpp`` or 1), in virtual-stage order.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.models.gpt import GPTModel

    cpu_mode.enable_cpu_mode()
    layer_spec = layer_spec if layer_spec is not None else default_layer_spec(spec)
    if spec.num_experts is not None:
        grouped = _grouped_experts(layer_spec)
        if spec.add_bias_linear and not grouped:
            raise ValueError(
                "GPTSpec.add_bias_linear=True with MoE experts of the local spec (SequentialMLP): "
                "megatron-core's expert MLP adds its bias in place on an autograd view and fails in the "
                "backward pass; set add_bias_linear=False (as MoE models usually are)")
        config_overrides.setdefault("moe_grouped_gemm", grouped)
        tp = _parallel_sizes()[0]
        if needs_sequence_parallel(spec, tp):
            config_overrides.setdefault("sequence_parallel", True)
    config = get_transformer_config(spec, **config_overrides)
    if config.sequence_parallel and _uses_torch_norm(layer_spec):
        stages = config.pipeline_model_parallel_size * (config.virtual_pipeline_model_parallel_size or 1)
        layer_spec = sequence_parallel_local_spec(layer_spec, config.num_layers // stages)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for stage in range(vpp or 1):
        vp_stage = stage if vpp is not None else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec,
            vocab_size=spec.vocab_size,
            max_sequence_length=spec.max_seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=spec.tie_embeddings,
            position_embedding_type=spec.position_embedding_type,
            rotary_base=spec.rotary_base,
            rope_scaling=spec.rope_scaling_factor is not None,
            rope_scaling_factor=spec.rope_scaling_factor or 8.0,
            vp_stage=vp_stage,
        )
        for param in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    if not wrap_ddp:
        return chunks
    if ddp_config is None:
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    if config.calculate_per_token_loss and ddp_config.average_in_collective:
        raise ValueError(
            "calculate_per_token_loss=True cannot be combined with average_in_collective=True: under the flag "
            "gradients are summed over dp x cp and divided once by the total token count; averaging in the "
            "collective would divide by the dp x cp size as well. Set average_in_collective=False")
    chunks = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=model,
                                disable_bucketing=index > 0)
        for index, model in enumerate(chunks)
    ]
    no_sync = [chunk.no_sync for chunk in chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return chunks


def _grouped_experts(layer_spec) -> bool:
    """Whether ``layer_spec``'s MoE experts are grouped-GEMM ones (TE's ``TEGroupedMLP``).

    The local spec's experts are Megatron's ``SequentialMLP`` (one MLP per local expert, runs on
    CPU); ``TransformerConfig.moe_grouped_gemm`` must say which of the two the spec builds.
    """
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_rl_agg.mcore.compat import spec_module, spec_submodules

    mlp = getattr(spec_submodules(layer_spec), "mlp", None)
    experts = getattr(spec_submodules(mlp), "experts", None)
    if experts is None:
        raise ValueError("GPTSpec.num_experts is set but the layer spec has no MoE experts; build it with "
                         "get_gpt_layer_*_spec(num_experts=...) or use default_layer_spec(spec)")
    return spec_module(experts) is not SequentialMLP


def unwrap(chunk):
    """The ``GPTModel`` inside a (possibly DDP-wrapped) chunk."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _flat_sharded_tensors(model):
    """Every ``ShardedTensor`` of ``model.sharded_state_dict()``, factories built into their parts."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = []
    stack = [model.sharded_state_dict()]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, ShardedTensorFactory):
            stack.append(item.build())
        elif isinstance(item, ShardedTensor):
            out.append(item)
    return out


def _param_shards(chunks):
    """``(param, ShardedTensor)`` pairs for every parameter view in the chunks' sharded state.

    A ShardedTensor's ``data`` is a parameter or a view of one (the gated MLP's fc1 is split into
    its two halves); each is matched to the parameter sharing its storage. Raises if a parameter
    is not covered exactly once, so an unknown sharding scheme cannot go unnoticed.
    """
    pairs = []
    for chunk in chunks:
        model = unwrap(chunk)
        named = list(model.named_parameters())
        covered = {id(p): 0 for _, p in named}
        for sh in _flat_sharded_tensors(model):
            if sh.data is None or sh.flattened_range is not None:
                continue
            param = _owning_param(sh.data, named)
            if param is None:
                continue
            covered[id(param)] += sh.data.numel()
            pairs.append((param, sh))
        bad = [name for name, p in named if covered[id(p)] != p.numel()]
        if bad:
            raise RuntimeError(f"sharded_state_dict does not cover these parameters exactly once: {bad}")
    return pairs


def _owning_param(view: torch.Tensor, named: list):
    """The parameter whose memory contains ``view`` (parameters may share one flat buffer)."""
    start = view.data_ptr()
    storage = view.untyped_storage().data_ptr()
    for _, param in named:
        begin = param.data_ptr()
        end = begin + param.numel() * param.element_size()
        if param.untyped_storage().data_ptr() == storage and begin <= start < end:
            return param
    return None


def _stable_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _full_init(key: str, layer: tuple[int, ...], shape: tuple[int, ...], seed: int, std: float,
               num_layers: int) -> torch.Tensor:
    """Deterministic full (unsharded) fp32 value of global key ``key`` at stacked-layer index ``layer``.

    Megatron's default init: biases 0, norm weights 1, other weights N(0, std), where the residual
    output projections (attention ``linear_proj``, MLP ``linear_fc2``) use std / sqrt(2 * num_layers)
    like ``scaled_init_method_normal``. The random stream is seeded from ``(seed, key, layer)`` only.
    """
    if key.endswith("bias"):
        return torch.zeros(shape)
    parts = key.split(".")
    name, module = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if "norm" in name or "norm" in module:  # final_layernorm.weight, linear_qkv.layer_norm_weight
        return torch.ones(shape)
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / (2.0 * num_layers) ** 0.5
    gen = torch.Generator().manual_seed(_stable_seed(seed, f"{key}{list(layer)}"))
    return torch.randn(shape, generator=gen) * std


@torch.no_grad()
def init_weights(chunks: list, seed: int) -> None:
    """Overwrite every parameter with a value that depends on ``(seed, global key)`` only.

    For each parameter shard the full tensor of its global key is generated (per layer for
    stacked layer keys, so a pipeline stage only generates its own layers) and the local slice
    (``ShardedTensor.global_slice()``) is copied in. Tied embedding copies share a key and so get
    equal values. Call before :func:`build_optimizer` (mixed-precision optimizers copy the
    parameters into fp32 main weights when built).
    """
    config = unwrap(chunks[0]).config
    for _, sh in _param_shards(chunks):
        prepend = sh.prepend_axis_num
        full = _full_init(sh.key, tuple(sh.global_offset[:prepend]), tuple(sh.global_shape[prepend:]),
                          seed, config.init_method_std, config.num_layers)
        local = full[sh.global_slice()[prepend:]]
        sh.data.copy_(local.reshape(sh.data.shape))


def build_optimizer(chunks: list, lr: float, *, weight_decay: float = 0.0, clip_grad: float = 1.0,
                    adam_beta1: float = 0.9, adam_beta2: float = 0.999, adam_eps: float = 1e-8,
                    use_distributed_optimizer: bool = False, **config_overrides):
    """Megatron's optimizer (``get_megatron_optimizer``, Adam) over DDP-wrapped chunks.

    Gradient clipping by global norm ``clip_grad`` (0 disables). bf16 models get fp32 main weights.
    Sets ``config.grad_scale_func = optimizer.scale_loss`` as Megatron-LM does (the scale is 1
    without fp16 loss scaling). ``use_distributed_optimizer`` must match the DDP config.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model_config = unwrap(chunks[0]).config
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        weight_decay=weight_decay,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        adam_eps=adam_eps,
        clip_grad=clip_grad,
        bf16=model_config.bf16,
        params_dtype=model_config.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
        **config_overrides,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    model_config.grad_scale_func = optimizer.scale_loss
    return optimizer


def _gather_full(chunks: list, read: Callable, check_replicas: bool) -> dict[str, torch.Tensor]:
    """All-gather ``read(param, shard) -> (value, valid)`` over the world and assemble full tensors.

    ``valid`` (bool, shard-shaped, or None for all) marks the elements this rank holds correctly.
    Every element must be valid on at least one rank; where several ranks hold it (DP replicas,
    TP-duplicated norms, the tied output-layer copy) the copies must agree if ``check_replicas``.
    """
    import torch.distributed as torch_dist

    local = []
    for param, sh in _param_shards(chunks):
        value, valid = read(param, sh)
        if valid is None:
            valid = torch.ones(value.shape, dtype=torch.bool)
        if bool(valid.any()):
            local.append((sh.key, tuple(sh.global_shape), sh.global_slice(),
                          value.detach().float().cpu().clone(), valid.cpu().clone()))
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        gathered = [None] * torch_dist.get_world_size()
        torch_dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    full, written = {}, {}
    for key, shape, index, value, valid in (entry for rank_entries in gathered for entry in rank_entries):
        if key not in full:
            full[key] = torch.zeros(shape)
            written[key] = torch.zeros(shape, dtype=torch.bool)
        target, seen = full[key][index], written[key][index]
        value, valid = value.reshape(target.shape), valid.reshape(target.shape)
        both = seen & valid
        if check_replicas and bool(both.any()):
            prev = target[both]
            diff = (prev - value[both]).abs().max().item()
            scale = max(prev.abs().max().item(), 1e-30)
            if diff > 1e-6 * scale:
                raise RuntimeError(
                    f"replicas of {key!r} disagree: max abs diff {diff:.3e} (scale {scale:.3e})")
        target[valid] = value[valid]
        seen[valid] = True
    missing = [key for key, seen in written.items() if not bool(seen.all())]
    if missing:
        raise RuntimeError(f"no rank holds part of these tensors: {missing}")
    return full


def _view_like(tensor: torch.Tensor, param: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` (shaped and laid out like ``param``) that ``view`` is of ``param``."""
    offset = view.storage_offset() - param.storage_offset()
    return tensor.as_strided(view.shape, view.stride(), tensor.storage_offset() + offset)


def _reduced_grad_masks(chunks: list) -> dict[int, torch.Tensor]:
    """Per parameter (by id), which ``main_grad`` elements hold the DP-reduced gradient.

    Only needed with the distributed optimizer: its reduce-scatter leaves each DP rank the reduced
    values of one contiguous shard of every bucket (``shard_buffer``), the rest stays local.
    """
    masks = {}
    for chunk in chunks:
        groups = getattr(chunk, "bucket_groups", []) + getattr(chunk, "expert_parallel_bucket_groups", [])
        for group in groups:
            if not group.ddp_config.use_distributed_optimizer:
                continue
            size = group.intra_distributed_optimizer_instance_size
            rank = group.intra_distributed_optimizer_instance_rank
            for bucket in group.buckets:
                shard = bucket.grad_data.numel() // size
                lo, hi = rank * shard, (rank + 1) * shard
                for param in bucket.params_list:
                    # main_grad is a view of the bucket's grad_data (params are padded apart).
                    start = param.main_grad.storage_offset() - bucket.grad_data.storage_offset()
                    mask = torch.zeros(param.numel(), dtype=torch.bool)
                    mask[max(lo - start, 0):max(min(hi - start, param.numel()), 0)] = True
                    masks[id(param)] = mask.view(param.shape)
    return masks


def gather_full_grads(chunks: list, *, check_replicas: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 gradient, keyed by global key, on every rank.

    Reads the DDP ``main_grad`` buffers (``param.grad`` for unwrapped chunks), so call it after the
    schedule has run ``finalize_model_grads`` (DP all-reduce or, with the distributed optimizer,
    reduce-scatter; tied-embedding sync) and before the optimizer step. With the distributed
    optimizer each element is taken from the DP rank whose shard holds it reduced. One
    ``all_gather_object`` over the world; a test/audit utility, not a hot path.

    Args:
        check_replicas: raise if copies of one element held by several ranks (DP replicas,
            TP-duplicated norms, the tied output-layer copy) differ by more than 1e-6 relative.
    """
    masks = _reduced_grad_masks(chunks)

    def read(param, sh):
        grad = getattr(param, "main_grad", None)
        grad = param.grad if grad is None else grad
        if grad is None:
            return torch.zeros(sh.data.shape), None
        mask = masks.get(id(param))
        return _view_like(grad, param, sh.data), None if mask is None else _view_like(mask, param, sh.data)

    return _gather_full(chunks, read, check_replicas)


def gather_full_params(chunks: list, *, check_replicas: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter's full value (as fp32), keyed by global key, on every rank."""
    return _gather_full(chunks, lambda param, sh: (sh.data, None), check_replicas)
