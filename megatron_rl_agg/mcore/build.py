"""Build a Megatron-Core GPT model (dense or MoE) at any TP/PP/VPP/DP/EP layout, and its optimizer.

Typical use (every rank, after :func:`compat.initialize_distributed`)::

    layout = parse_layout("pp2+vpp2+m4")       # megatron_rl_agg.parallel.layout
    initialize_model_parallel(layout.tp, layout.pp, layout.vpp, seed=1)
    chunks = build_model(spec)                 # one DDP-wrapped GPTModel per virtual stage
    init_weights(chunks, seed=1)               # same full weights at every layout (mcore.weights)
    optimizer = build_optimizer(chunks, lr=1e-5)
    for c in chunks: c.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=..., model=chunks,
                                num_microbatches=layout.num_microbatches, ...)
    grads = gather_full_grads(chunks)          # {global key: full fp32 gradient}, every rank (mcore.weights)

The architecture and its ``TransformerConfig``: :mod:`megatron_rl_agg.mcore.spec`; layout-independent
weights and full gradients: :mod:`megatron_rl_agg.mcore.weights`.
"""

from __future__ import annotations

import torch

from megatron_rl_agg.mcore import compat, cpu_mode
from megatron_rl_agg.mcore.spec import (GPTSpec, _uses_torch_norm, default_layer_spec,
                                        get_transformer_config, needs_sequence_parallel,
                                        sequence_parallel_local_spec)

__all__ = ["build_model", "unwrap", "build_optimizer"]


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
        tp = compat.parallel_sizes()[0]
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


def build_optimizer(chunks: list, lr: float, *, weight_decay: float = 0.0, clip_grad: float = 1.0,
                    adam_beta1: float = 0.9, adam_beta2: float = 0.999, adam_eps: float = 1e-8,
                    use_distributed_optimizer: bool = False, **config_overrides):
    """Megatron's optimizer (``get_megatron_optimizer``, Adam) over DDP-wrapped chunks.

    Gradient clipping by global norm ``clip_grad`` (0 disables). bf16 models get fp32 main weights.
    Sets ``config.grad_scale_func = optimizer.scale_loss`` as Megatron-LM does (the scale is 1
    without fp16 loss scaling) and, where the release has it (0.19), ``config.moe_grad_scale_func =
    optimizer.get_loss_scale``. ``use_distributed_optimizer`` must match the DDP config.
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
    if hasattr(model_config, "moe_grad_scale_func"):
        # megatron-core >= 0.19 scales the MoE aux-loss gradient by moe_grad_scale_func() apart from the main
        # loss: the optimizer's loss scale, the same under every aggregation mode, flag and layout (the
        # plugin's loss carries its own factors; Megatron divides the aux scale by M itself). 0.16 has no
        # such field and scales the aux loss by grad_scale_func(1), the same value.
        model_config.moe_grad_scale_func = optimizer.get_loss_scale
    return optimizer
