"""Construction of a training run: distributed state, Megatron's groups, model, optimizer, reference, data.

:func:`build_trainer` turns parsed flags (:mod:`megatron_rl_agg.trainer.cli.arguments`) into a
:class:`Trainer`: it initialises ``torch.distributed`` and Megatron's model-parallel groups (any TP / PP /
VPP / CP / EP layout), builds the GPT model chunks (from the size flags or ``--hf-checkpoint``, with the
layer spec the flags ask for) and their optimizer, the frozen KL reference (``--kl-coef > 0``), and the
rollout source (an offline file or on-policy generation); with ``--load`` it refuses resumes megatron-core
cannot do, before any collective of the load, then restores the checkpoint (:mod:`.checkpoint`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Optional

from megatron_rl_agg.mcore import compat
from megatron_rl_agg.core.config import AdvantageConfig, LossConfig
from megatron_rl_agg.trainer.step import reference
from megatron_rl_agg.trainer.loop import checkpoint
from megatron_rl_agg.trainer.rollout import generation, task
from megatron_rl_agg.trainer.cli.arguments import check_world, virtual_pipeline_size
from megatron_rl_agg.trainer.cli.validation import TrainerArgsError, check_rollout_rows
from megatron_rl_agg.trainer.rollout.rollouts import check_sample_routes
from megatron_rl_agg.trainer.rollout.sources import OfflineSource, OnPolicySource

__all__ = ["Trainer", "build_trainer", "model_sizes"]


@dataclass
class Trainer:
    """Everything one training run holds."""

    args: argparse.Namespace
    chunks: list
    optimizer: Any
    ref_chunks: Optional[list]
    loss_cfg: LossConfig
    adv_cfg: AdvantageConfig
    source: Any
    layout: dict
    rank: int
    world_size: int
    start_step: int = 0

    @property
    def dp_group(self):
        """The data-parallel group WITHOUT context parallelism: rows, counts and advantages live on it (the
        CP ranks of one DP rank hold the same rows)."""
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    @property
    def cp_group(self):
        """The context-parallel group (None without CP)."""
        from megatron.core import parallel_state

        return parallel_state.get_context_parallel_group() if self.layout.get("cp", 1) > 1 else None

    @property
    def metrics_group(self):
        """dp x cp: under CP every rank reports partial sums of its row shards."""
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group(with_context_parallel=True)


def _model_spec(args):
    from megatron_rl_agg.mcore.spec import GPTSpec

    if args.hf_checkpoint:
        from megatron_rl_agg.trainer.loop.hf_model import hf_model_spec

        return hf_model_spec(args)
    return GPTSpec(num_layers=args.num_layers, hidden_size=args.hidden_size,
                   num_attention_heads=args.num_attention_heads, vocab_size=args.vocab_size,
                   max_seq_length=args.seq_length, ffn_hidden_size=args.ffn_hidden_size, bf16=args.bf16,
                   add_bias_linear=not args.disable_bias_linear, num_experts=args.num_experts,
                   moe_router_topk=args.moe_router_topk,
                   moe_token_dispatcher_type=args.moe_token_dispatcher_type,
                   moe_aux_loss_coeff=args.moe_aux_loss_coeff)


def _layer_spec(args, spec):
    from megatron.core.models.gpt import gpt_layer_specs

    impl = args.transformer_impl
    if impl == "auto":
        # Transformer Engine's spec on CUDA when TE imports (the model module's own test of it).
        from megatron_rl_agg.mcore.spec import _use_transformer_engine

        impl = "transformer_engine" if _use_transformer_engine() else "local"
    if args.sequence_packing and impl == "local":
        # Megatron's local attention has no THD path; the packing module's spec adds one.
        from megatron_rl_agg.mcore.packed_attention import packed_local_layer_spec

        return packed_local_layer_spec(normalization=spec.normalization, qk_layernorm=spec.qk_layernorm)
    if impl == "local" and args.context_parallel_size > 1:
        # Megatron's local DotProductAttention refuses CP; the plugin's CP attention is its drop-in.
        from megatron_rl_agg.mcore.cp_attention import cp_local_layer_spec

        return cp_local_layer_spec(normalization=spec.normalization, qk_layernorm=spec.qk_layernorm)
    if impl == "local":
        return gpt_layer_specs.get_gpt_layer_local_spec(num_experts=spec.num_experts,
                                                        normalization=spec.normalization,
                                                        qk_layernorm=spec.qk_layernorm)
    if args.transformer_impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
        except ImportError as err:
            raise TrainerArgsError(
                f"--transformer-impl transformer_engine: {err}; use local or auto") from None
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
        num_experts=spec.num_experts, moe_grouped_gemm=spec.num_experts is not None,
        qk_layernorm=spec.qk_layernorm)


def _build_policy(args, spec):
    from megatron.core.distributed import DistributedDataParallelConfig

    from megatron_rl_agg.mcore.build import build_model, build_optimizer
    from megatron_rl_agg.mcore.weights import init_weights

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=args.use_distributed_optimizer,
                                               average_in_collective=args.ddp_average_in_collective)
    chunks = build_model(spec, layer_spec=_layer_spec(args, spec), ddp_config=ddp_config,
                         calculate_per_token_loss=args.calculate_per_token_loss,
                         **({"moe_enable_routing_replay": True}
                            if getattr(args, "moe_routing_replay", "off") != "off" else {}))
    if args.hf_checkpoint:                          # each rank reads only the slices it holds
        from megatron_rl_agg.trainer.loop.hf_model import load_hf_policy

        load_hf_policy(chunks, args)
    else:
        init_weights(chunks, seed=args.seed)        # layout-independent: a function of (seed, key) only
    optimizer = build_optimizer(
        chunks, lr=args.lr, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        use_distributed_optimizer=args.use_distributed_optimizer)
    return chunks, optimizer


def _build_reference(args, spec) -> Optional[list]:
    """Frozen reference policy for --kl-coef > 0 (see :mod:`megatron_rl_agg.trainer.step.reference`): the
    weights of ``--ref-load``, else of ``--hf-checkpoint``, else the initial weights of ``--seed``; None
    without a KL term."""
    if args.kl_coef == 0:
        return None
    init_fn = None
    if args.ref_load:
        checkpoint.check_model(args.ref_load, checkpoint.resolve_step(args.ref_load)[0], model_sizes(args))

        def init_fn(ref):
            checkpoint.load_model_weights(args.ref_load, ref)
    elif args.hf_checkpoint:
        from megatron_rl_agg.trainer.loop.hf_model import load_hf_policy

        def init_fn(ref):
            load_hf_policy(ref, args)
    return reference.build_reference(spec, _layer_spec(args, spec), seed=args.seed, init_fn=init_fn)


def _build_source(args):
    if args.rollouts:
        tokenize = None
        if args.tokenizer or args.hf_checkpoint:   # text prompts / responses in the file
            from megatron_rl_agg.trainer.rollout.hf_text import text_tokenizer

            tokenize = text_tokenizer(args)
        source = OfflineSource(args.rollouts, args.global_batch_size, args.vocab_size,
                               args.mini_batches_per_step, tokenize=tokenize)
        check_rollout_rows(source.samples, args.seq_length, args.rollouts)   # the whole file, before step 1
        source.check_versions(args.train_iters)      # every version <= k - 1 at its first step k
        if args.max_staleness is not None and not source.has_versions:
            raise TrainerArgsError(f"--max-staleness {args.max_staleness}: {args.rollouts} has no 'versions' "
                                   "(the policy version of each token); add them or drop the flag")
        if getattr(args, "moe_routing_replay", "off") == "r3":            # routes against the model
            try:
                check_sample_routes(source.samples, args.num_layers, args.moe_router_topk, args.num_experts,
                                    args.rollouts)
            except ValueError as err:
                raise TrainerArgsError(str(err)) from None
        if args.recompute_logprobs and not source.has_logprobs:
            raise TrainerArgsError(f"--recompute-logprobs: {args.rollouts} has no 'logprobs' (the behaviour "
                                   "log-probs to correct against); add them or drop the flag")
        return source
    if args.prompt_data:
        from megatron_rl_agg.trainer.rollout.hf_text import text_task

        counting = text_task(args)          # prompts checked against --seq-length and the vocabulary
    else:
        counting = task.CountingTask(min_count=args.task_min_count, max_count=args.task_max_count,
                                     max_distractors=args.task_max_distractors)
        counting.check_vocab(args.vocab_size)
    if counting.max_prompt_length + args.max_new_tokens > args.seq_length + 1:
        raise TrainerArgsError(
            f"--seq-length {args.seq_length} is too short: prompts of up to {counting.max_prompt_length} "
            f"tokens + --max-new-tokens {args.max_new_tokens} need >= "
            f"{counting.max_prompt_length + args.max_new_tokens - 1}")
    spec = generation.RolloutSpec(
        task=counting,
        num_prompts=args.mini_batches_per_step * args.global_batch_size // args.num_samples_per_prompt,
        samples_per_prompt=args.num_samples_per_prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, failure_prob=args.rollout_failure_prob, vocab_size=args.vocab_size,
        seed=args.seed)
    if args.rollout_engine == "vllm":
        from megatron_rl_agg.trainer.loop.engine import build_engine_source

        return build_engine_source(args, spec)
    return OnPolicySource(spec, args.seq_length, args.micro_batch_size, args.mini_batches_per_step)


def build_trainer(args: argparse.Namespace) -> Trainer:
    """Initialise distributed state and Megatron's parallel groups, build model, optimizer, data."""
    compat.quiet_warnings()
    from megatron.core import parallel_state

    checkpoint.check_save_dir(args.save, args.load)      # on every rank, before any collective
    _check_export_step(args)
    rank, world = compat.initialize_distributed(timeout_minutes=args.distributed_timeout_minutes)
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    cp = args.context_parallel_size
    check_world(args, world)
    compat.initialize_model_parallel(tp, pp, virtual_pipeline_size(args), cp=cp, seed=args.seed, ep=ep,
                                              timeout_minutes=args.distributed_timeout_minutes)
    spec = _model_spec(args)
    chunks, optimizer = _build_policy(args, spec)
    layout = {"tp": tp, "pp": pp, "vpp": virtual_pipeline_size(args),
              "dp": parallel_state.get_data_parallel_world_size()}
    if cp > 1:   # only when used, so checkpoints of CP-free runs keep their layout record
        layout["cp"] = cp
    if ep > 1:   # likewise for expert parallelism
        layout["ep"] = ep
    trainer = Trainer(args=args, chunks=chunks, optimizer=optimizer, ref_chunks=_build_reference(args, spec),
                      loss_cfg=LossConfig.from_args(args), adv_cfg=AdvantageConfig.from_args(args),
                      source=_build_source(args), layout=layout, rank=rank, world_size=world)
    if args.load:
        _check_resumable(args)
        step, note = checkpoint.resolve_step(args.load, fallback=args.load_fallback)
        checkpoint.check_model(args.load, step, model_sizes(args))
        if rank == 0 and note:
            print(f"[megatron_rl_agg] {note}")
        saved = checkpoint.load_checkpoint(args.load, chunks, optimizer, layout, rank=rank, world_size=world,
                                           step=step)
        trainer.start_step = saved["step"]
        saved_args = saved.get("args", {})
        changed = {k: (v, getattr(args, k)) for k, v in saved_args.items() if getattr(args, k, v) != v}
        if rank == 0 and changed:
            print(f"[megatron_rl_agg] resuming {args.load} with changed settings (saved -> now): {changed}; "
                  "the following steps will differ from the run that saved it")
        if rank == 0 and not saved["rng_restored"]:
            print(f"[megatron_rl_agg] resumed step {saved['step']} from {args.load} saved at layout "
                  f"{saved.get('layout')} (world {saved.get('world_size')}); this run is {layout} (world "
                  f"{world}): per-process RNG states not restored (the trainer's draws are counter-based)")
    return trainer


def _check_export_step(args) -> None:
    """``--load CKPT --save-hf OUT`` with ``--train-iters`` below the saved step has neither a step to train
    nor the step asked for to export: refuse (naming the step that exports) before any collective."""
    if not (args.load and args.save_hf):
        return
    step, _ = checkpoint.resolve_step(args.load, fallback=args.load_fallback)
    if step > args.train_iters:
        raise checkpoint.CheckpointError(
            f"--load {args.load} is at step {step}, past --train-iters {args.train_iters}: nothing to train "
            f"and nothing to export at step {args.train_iters}; --train-iters {step} --save-hf exports the "
            "checkpoint (or use megatron-rl-agg export-hf)")


def model_sizes(args) -> dict:
    """The architecture a checkpoint records and a load must match (:data:`checkpoint.MODEL_KEYS`)."""
    return {k: getattr(args, k) for k in checkpoint.MODEL_KEYS}


def _check_resumable(args) -> None:
    """Refuse a resume that megatron-core cannot do here, before any collective of the load starts."""
    from megatron.core.optimizer import distrib_optimizer

    if args.use_distributed_optimizer and not getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        # DistributedOptimizer.state_dict() needs a per-parameter Adam 'step' that the torch-Adam fallback
        # (no Transformer Engine, no apex) only creates at the first update, so loading into a fresh
        # optimizer fails inside megatron-core.
        raise TrainerArgsError(
            "--load with --use-distributed-optimizer needs Transformer Engine or apex (megatron-core's "
            "DistributedOptimizer cannot load into its torch-Adam fallback); resume without "
            "--use-distributed-optimizer on this machine")
    if args.num_experts is not None:
        _check_expert_parallel_resume(args)


def _check_expert_parallel_resume(args) -> None:
    """An MoE checkpoint resumes at EP 1 only if saved at EP 1, and at EP > 1 only if saved at EP > 1.

    megatron-core's optimizer for an MoE model at EP > 1 is a ChainedOptimizer (dense and expert
    parameters apart, each with its own param_groups); at EP 1 it is a single optimizer. The two state
    layouts do not load into each other (KeyError inside megatron-core), so refuse before any collective.
    """
    import json
    import os

    path = os.path.join(checkpoint.checkpoint_path(args.load, checkpoint.latest_step(args.load)),
                        checkpoint.STATE_FILE)
    with open(path, encoding="utf-8") as fh:
        saved_ep = int(json.load(fh).get("layout", {}).get("ep", 1))
    ep = args.expert_model_parallel_size
    if (saved_ep > 1) != (ep > 1):
        raise TrainerArgsError(
            f"--load {args.load}: saved at expert-parallel size {saved_ep}, this run has {ep}. megatron-core "
            "keeps an MoE model's optimizer state as one optimizer at EP 1 and as a chained one (dense + expert "
            "parameters) at EP > 1, which do not load into each other; resume with "
            f"--expert-model-parallel-size {'1' if saved_ep == 1 else 'of 2 or more'} (any TP / PP / DP)")
