"""The GRPO-family training loop on Megatron-Core (any TP / PP / VPP / CP / DP layout).

One step = ``K = --mini-batches-per-step`` optimizer updates (default 1), each on one mini-batch of whole
prompt groups. Before the first update, for every mini-batch:

1. rows: this DP rank's share of the mini-batch, from the offline file or generated on-policy;
2. advantages over the whole mini-batch (``compute_step_advantages`` over the DP group: real group ids,
   overlong policy, group dropping); rows the policy excludes get ``loss_mask = 0``;
3. padding: every DP rank gets the same number of whole micro-batches (a multiple of PP under
   interleaving) by appending fully masked rows, which change nothing;
4. reference log-probs (``--kl-coef > 0``); old log-probs, when the file has none and ``K > 1``, from the
   current model. With ``K = 1`` the loss uses the detached current log-probs of the update's own forward
   pass as the old ones: the same numbers as a recomputation (ratio 1), one forward pass fewer.

Then, per mini-batch: ``prepare_microbatches`` (global aggregation weights, once per mini-batch),
Megatron's forward-backward schedule with :func:`megatron_rl_agg.mcore.loss.forward_step`, the
optimizer step; metrics reduced exactly over micro-batches and DP ranks, handed from the last pipeline
stage to rank 0, and combined over the mini-batches into one line per step.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from megatron_rl_agg.parallel import dist
from megatron_rl_agg.mcore import compat, cpu_mode
from megatron_rl_agg.core.advantages import compute_step_advantages
from megatron_rl_agg.core.config import AdvantageConfig, LossConfig
from megatron_rl_agg.trainer.step import batching, forward, reference
from megatron_rl_agg.trainer.loop import checkpoint, safety
from megatron_rl_agg.trainer.rollout import generation, task
from megatron_rl_agg.trainer.cli.arguments import TrainerArgsError, check_world, virtual_pipeline_size
from megatron_rl_agg.trainer.loop.reporting import METRIC_KEYS, MetricsLogger
from megatron_rl_agg.trainer.rollout.sources import OfflineSource, OnPolicySource

__all__ = ["Trainer", "build_trainer", "train_step", "run"]

# Loss-function report names exported to the metrics line (name in the report -> metrics key).
_LOSS_REPORT = (("policy_loss/sum", "policy_loss"), ("kl_loss/sum", "kl_loss"), ("entropy/mean", "entropy"),
                ("entropy_loss/sum", "entropy_loss"), ("loss/sum", "loss"), ("clip_frac/mean", "clip_frac"),
                ("ppo_kl/mean", "ppo_kl"), ("num_tokens/sum", "num_tokens"))


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
    from megatron_rl_agg.mcore.model import GPTSpec

    if args.hf_checkpoint:
        from megatron_rl_agg.hf.trainer_glue import hf_model_spec

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
        from megatron_rl_agg.mcore.model import _use_transformer_engine

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

    from megatron_rl_agg.mcore.model import build_model, build_optimizer, init_weights

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=args.use_distributed_optimizer,
                                               average_in_collective=args.ddp_average_in_collective)
    chunks = build_model(spec, layer_spec=_layer_spec(args, spec), ddp_config=ddp_config,
                         calculate_per_token_loss=args.calculate_per_token_loss)
    if args.hf_checkpoint:                          # each rank reads only the slices it holds
        from megatron_rl_agg.hf.trainer_glue import load_hf_policy

        load_hf_policy(chunks, args)
    else:
        init_weights(chunks, seed=args.seed)        # layout-independent: a function of (seed, key) only
    optimizer = build_optimizer(
        chunks, lr=args.lr, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        use_distributed_optimizer=args.use_distributed_optimizer)
    return chunks, optimizer


def _build_reference(args, spec) -> Optional[list]:
    """Frozen reference policy for --kl-coef > 0 (see :mod:`.reference`), else None."""
    if args.kl_coef == 0:
        return None
    if args.ref_load:
        checkpoint.check_model(args.ref_load, checkpoint.resolve_step(args.ref_load)[0], _model_sizes(args))
    init_fn = None
    if args.hf_checkpoint:
        from megatron_rl_agg.hf.trainer_glue import load_hf_policy

        def init_fn(ref):
            load_hf_policy(ref, args)
    return reference.build_reference(spec, _layer_spec(args, spec), seed=args.seed, ref_load=args.ref_load,
                                     init_fn=init_fn)


def _build_source(args):
    if args.rollouts:
        tokenize = None
        if args.tokenizer or args.hf_checkpoint:   # text prompts / responses in the file
            from megatron_rl_agg.hf.trainer_glue import text_tokenizer

            tokenize = text_tokenizer(args)
        source = OfflineSource(args.rollouts, args.global_batch_size, args.vocab_size,
                               args.mini_batches_per_step, tokenize=tokenize)
        from megatron_rl_agg.trainer.cli.validation import check_rollout_rows

        check_rollout_rows(source.samples, args.seq_length, args.rollouts)   # the whole file, before step 1
        return source
    if args.prompt_data:
        from megatron_rl_agg.hf.trainer_glue import text_task

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
    return OnPolicySource(spec, args.seq_length, args.micro_batch_size, args.mini_batches_per_step)


def build_trainer(args: argparse.Namespace) -> Trainer:
    """Initialise distributed state and Megatron's parallel groups, build model, optimizer, data."""
    compat.quiet_warnings()
    from megatron.core import parallel_state

    checkpoint.check_save_dir(args.save, args.load)      # on every rank, before any collective
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
        checkpoint.check_model(args.load, step, _model_sizes(args))
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


def _model_sizes(args) -> dict:
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


# ----------------------------------------------------------------------------------------------
# one step
# ----------------------------------------------------------------------------------------------

def _padded_rows(tr: Trainer, num_local: int) -> int:
    """Rows every DP rank holds after padding: the largest rank's whole micro-batches, rounded up to the
    micro-batch multiple of the schedule (PP under interleaving), at least one micro-batch."""
    mbs, multiple = tr.args.micro_batch_size, forward.microbatch_multiple()
    local = torch.tensor([max(1, math.ceil(num_local / mbs))], dtype=torch.int64,
                         device=cpu_mode.device())
    num_mb = int(dist.all_reduce_max(local, tr.dp_group).item())
    return math.ceil(num_mb / multiple) * multiple * mbs


def _local_batch(tr: Trainer, step: int, index: int) -> tuple[dict, dict]:
    """This rank's padded rows of mini-batch ``index`` of ``step`` (a ``prepare_microbatches`` dict) and the
    mini-batch's row statistics (global over DP: counts and sums, see :func:`_combine`)."""
    from megatron.core import parallel_state

    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    failures_before = _reward_failures(tr)
    step_rows = tr.source.local_rows(step, index, dp_size, dp_rank, chunks=tr.chunks)
    rows = batching.build_rows(step_rows.samples, tr.args.seq_length, step_rows.group_ids)
    rows = rows.to(cpu_mode.device())
    adv, keep_row, stats = compute_step_advantages(
        rows.rewards, rows.group_ids, truncated=rows.truncated, cfg=tr.adv_cfg, process_group=tr.dp_group,
        expected_group_size=tr.source.expected_group_size)
    rows = replace(rows, loss_mask=rows.loss_mask * keep_row.unsqueeze(1).to(rows.loss_mask.dtype))
    stats.update(_row_sums(step_rows, tr.dp_group, _reward_failures(tr) - failures_before))
    rows, adv = batching.pad_rows(rows, adv, _padded_rows(tr, rows.num_rows), dp_rank)
    batch = {"tokens": rows.tokens, "labels": rows.labels, "loss_mask": rows.loss_mask, "advantages": adv,
             "old_logprobs": rows.old_logprobs, "group_ids": rows.group_ids, "ref_logprobs": None}
    if tr.ref_chunks is not None:
        batch["ref_logprobs"] = reference.reference_logprobs(tr.ref_chunks, rows.tokens, rows.labels,
                                                             tr.args.micro_batch_size)
    return batch, stats


def _reward_failures(tr: Trainer) -> int:
    """Samples whose text reward raised so far on this rank (scored 0; see ``megatron_rl_agg.hf.rewards``)."""
    scorer = getattr(getattr(getattr(tr.source, "spec", None), "task", None), "scorer", None)
    return scorer.num_failures if scorer is not None else 0


def _row_sums(step_rows, dp_group, reward_failures: int = 0) -> dict:
    """Reward and response-length sums, lost samples and reward failures over the rows on all DP ranks (one
    all-reduce)."""
    samples = step_rows.samples
    local = torch.tensor([sum(s.reward for s in samples), float(sum(len(s.response) for s in samples)),
                          float(step_rows.num_failed), float(reward_failures)], dtype=torch.float64,
                         device=cpu_mode.device())
    reward_sum, length_sum, num_failed, failures = dist.all_reduce_sum(local, dp_group).tolist()
    return {"reward_sum": reward_sum, "length_sum": length_sum, "num_failed_samples": int(num_failed),
            "num_reward_failures": int(failures)}


def _step_batches(tr: Trainer, step: int) -> list[tuple[dict, dict]]:
    """Every mini-batch of the step, built before the first update.

    With several mini-batches, rows without behaviour log-probs get the current model's (forward only,
    before any update): the "old" policy of every mini-batch is the one that generated / precedes the
    step. With one mini-batch they stay None and the loss uses the detached log-probs of the update's own
    forward pass: the same numbers, one forward pass fewer.
    """
    batches = [_local_batch(tr, step, j) for j in range(tr.args.mini_batches_per_step)]
    if tr.args.mini_batches_per_step > 1:
        for batch, _ in batches:
            if batch["old_logprobs"] is None:
                batch["old_logprobs"] = forward.compute_logprobs(tr.chunks, batch["tokens"], batch["labels"],
                                                                 tr.args.micro_batch_size)
    return batches


_SUMMED = ("num_groups", "num_partial_groups", "num_dropped_groups", "num_truncated", "num_rows",
           "num_stat_rows", "num_failed_samples", "num_reward_failures", "num_tokens", "num_skipped_updates")


def _combine(parts: list[dict]) -> dict:
    """One metrics line from the mini-batches of a step: counts summed, reward and response length over
    all rows, every loss term and the grad norm averaged over the mini-batches."""
    out = {key: sum(p[key] for p in parts) for key in _SUMMED}
    rows = max(out["num_rows"], 1)
    out["reward_mean"] = sum(p["reward_sum"] for p in parts) / rows
    out["response_length"] = sum(p["length_sum"] for p in parts) / rows
    averaged = [k for k in parts[0] if k not in _SUMMED and k not in ("reward_sum", "length_sum")]
    out.update({key: sum(p[key] for p in parts) / len(parts) for key in averaged})
    return out


def _schedule_inputs(tr: Trainer, micro: list) -> tuple[list, Any, int, int]:
    """``(micro_batches, forward_step_func, seq_length, micro_batch_size)`` for Megatron's schedule.

    With ``--sequence-packing`` each micro-batch becomes one THD sequence of its rows' real tokens
    (:mod:`megatron_rl_agg.mcore.packing`; loss and gradients equal the padded run). Under pipeline parallelism
    the packs are padded to one common length, the activation shape every stage must agree on.
    """
    from megatron_rl_agg.mcore.loss import forward_step

    if not tr.args.sequence_packing:
        return micro, forward_step, tr.args.seq_length, tr.args.micro_batch_size
    from megatron_rl_agg.mcore.packing import pack_microbatches, packed_forward_step

    packed = pack_microbatches(micro, pad_to_multiple_of=tr.args.pack_pad_to_multiple_of,
                               equal_length=tr.layout["pp"] > 1)
    return packed, packed_forward_step, packed[0]["tokens"].shape[1], 1


def _run_update(tr: Trainer, batch: dict, step: int = 0, index: int = 0) -> tuple[list, float, bool, Any]:
    """Forward-backward over the micro-batches and one optimizer step; returns (reports, grad_norm,
    applied, MoE load-balancing loss or None). A non-finite loss term or gradient raises or, with
    ``--on-nonfinite skip``, drops the update (``applied`` False, grad_norm NaN): see
    :func:`.safety.check_update`."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rl_agg.mcore.batch import prepare_microbatches

    # vocab_size: the labels are checked here, once per mini-batch, so loss_func reads nothing back
    micro = prepare_microbatches(batch, tr.loss_cfg, tr.args.micro_batch_size, dp_group=tr.dp_group,
                                 cp_group=tr.cp_group, calculate_per_token_loss=tr.args.calculate_per_token_loss,
                                 vocab_size=tr.args.vocab_size)
    micro, step_func, seq_length, mbs = _schedule_inputs(tr, micro)
    for chunk in tr.chunks:
        chunk.zero_grad_buffer()
    tr.optimizer.zero_grad()
    iterator = [iter(micro) for _ in tr.chunks] if len(tr.chunks) > 1 else iter(micro)
    reports = get_forward_backward_func()(
        forward_step_func=step_func, data_iterator=iterator, model=tr.chunks, num_microbatches=len(micro),
        seq_length=seq_length, micro_batch_size=mbs, forward_only=False)
    aux = _load_balancing_loss(tr, len(micro))
    if not safety.check_update(tr.optimizer, reports, step=step, index=index,
                               num_updates=tr.args.mini_batches_per_step, policy=tr.args.on_nonfinite,
                               source=tr.source, device=cpu_mode.device()):
        for chunk in tr.chunks:
            chunk.zero_grad_buffer()
        tr.optimizer.zero_grad()
        return reports, float("nan"), False, aux
    _, grad_norm, _ = tr.optimizer.step()
    return reports, float(grad_norm) if grad_norm is not None else float("nan"), True, aux


def _load_balancing_loss(tr: Trainer, num_microbatches: int) -> Optional[float]:
    """Megatron's MoE load-balancing loss of this update, before ``--moe-aux-loss-coeff``: the mean over
    MoE layers and micro-batches (and, by Megatron's tracker reduction, over PP stages and DP ranks).

    The router adds each micro-batch's per-layer loss to Megatron's tracker; the reduction is Megatron's
    (all-reduce over PP, then average over DP: collectives on every rank, ``compat.
    moe_metric_per_layer``), after which the tracker is cleared for the next update. None for a dense
    model.
    """
    if tr.args.num_experts is None or tr.args.moe_aux_loss_coeff == 0:
        return None
    values = compat.moe_metric_per_layer("load_balancing_loss")
    if values is None:
        raise RuntimeError("no MoE load-balancing loss was tracked in this update (expected one per layer)")
    return float(values.sum()) / (values.numel() * num_microbatches)


def _loss_metrics(tr: Trainer, reports: list) -> dict:
    """Loss-function reports reduced over micro-batches and DP (last stage), then on every stage."""
    from megatron_rl_agg.core.metrics import reduce_metrics

    reduced = reduce_metrics(reports, tr.metrics_group) if reports else None
    values = None
    if reduced is not None:
        values = torch.tensor([reduced.get(name, 0.0) for name, _ in _LOSS_REPORT], dtype=torch.float64,
                              device=cpu_mode.device())
    values = forward.broadcast_from_last_stage(values, (len(_LOSS_REPORT),), torch.float64)
    out = {key: float(v) for (_, key), v in zip(_LOSS_REPORT, values.tolist())}
    out["num_tokens"] = int(round(out["num_tokens"]))
    return out


def train_step(tr: Trainer, step: int) -> dict:
    """Run step ``step`` (1-based): ``--mini-batches-per-step`` optimizer updates; returns its metrics line
    (identical on every rank)."""
    start = time.perf_counter()
    for chunk in tr.chunks:
        chunk.train()
    parts = []
    for index, (batch, stats) in enumerate(_step_batches(tr, step)):
        reports, grad_norm, applied, aux = _run_update(tr, batch, step, index)
        part = {**_loss_metrics(tr, reports), "grad_norm": grad_norm,
                "num_skipped_updates": int(not applied), **stats}
        if aux is not None:
            part["load_balancing_loss"] = aux
        parts.append(part)
    combined = {"step": step, **_combine(parts), "lr": tr.args.lr,
                "step_time_s": round(time.perf_counter() - start, 4)}
    # documented keys first, in docs/training.md's order, then the rest
    return {**{k: combined[k] for k in METRIC_KEYS if k in combined}, **combined}


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------

def _save(tr: Trainer, step: int) -> None:
    keep = ("seed", "rollouts", "global_batch_size", "mini_batches_per_step", "num_samples_per_prompt",
            "loss_aggregation", "adv_estimator", "overlong_policy", "num_experts", "moe_router_topk",
            "moe_aux_loss_coeff")
    state = {"layout": tr.layout, "args": {k: getattr(tr.args, k) for k in keep},
             "model": _model_sizes(tr.args)}
    checkpoint.save_checkpoint(tr.args.save, step, tr.chunks, tr.optimizer, state, rank=tr.rank,
                               world_size=tr.world_size)


def _save_hf(tr: Trainer) -> None:
    from megatron_rl_agg.hf.trainer_glue import save_hf

    save_hf(tr.chunks, tr.args)


def run(args: argparse.Namespace) -> list[dict]:
    """Train from ``args`` (see :mod:`.arguments`); returns every step's metrics (on every rank).

    Re-entrant: tears down Megatron's model-parallel state at the end, so one process can run several
    layouts one after another (the tests do). SIGINT / SIGTERM stop it after the current step (saved to
    ``--save`` with ``--save-on-interrupt``, the default); a collective that exceeds
    ``--distributed-timeout-minutes`` raises :class:`.safety.DistributedTimeoutError`.
    """
    tr = build_trainer(args)
    if tr.start_step >= args.train_iters:
        if tr.rank == 0:
            print(f"[megatron_rl_agg] nothing to train: --load {args.load} is at step {tr.start_step} and "
                  f"--train-iters is {args.train_iters}; raise --train-iters to continue")
        compat.destroy_model_parallel()
        return []
    if tr.rank == 0 and args.load:
        # Lines after the loaded step are of steps this run trains again: keep each step once.
        dropped = safety.truncate_metrics(args.metrics_file, tr.start_step)
        if dropped:
            print(f"[megatron_rl_agg] {args.metrics_file}: dropped {dropped} line(s) after step "
                  f"{tr.start_step}, the step resumed from")
    logger = MetricsLogger(enabled=tr.rank == 0, metrics_file=args.metrics_file,
                           tensorboard_dir=args.tensorboard_dir, total_steps=args.train_iters,
                           start_step=tr.start_step, resume=bool(args.load),
                           progress_bar=not args.no_progress_bar)
    history = []
    try:
        with safety.StopSignal() as stop:
            for step in range(tr.start_step + 1, args.train_iters + 1):
                metrics = train_step(tr, step)
                history.append(metrics)
                logger.log(metrics)
                stopping = stop.requested(cpu_mode.device())
                periodic = args.save_interval and step % args.save_interval == 0
                on_signal = stopping and args.save_on_interrupt
                if args.save and (step == args.train_iters or periodic or on_signal):
                    _save(tr, step)
                if args.save_hf and periodic and step != args.train_iters and not stopping:
                    _save_hf(tr)
                if stopping:
                    if tr.rank == 0:
                        saved = f", saved to {args.save}" if args.save and args.save_on_interrupt else ""
                        print(f"[megatron_rl_agg] stopped by a signal after step {step}{saved}; resume with "
                              f"--load {args.save or '<dir>'}", flush=True)
                    break
            else:
                if args.save_hf:         # after the last step (or, with --train-iters 0, the conversion)
                    _save_hf(tr)
    except RuntimeError as err:
        if safety.is_timeout(err) and not isinstance(err, safety.NonFiniteError):
            raise safety.describe_timeout(err, args.distributed_timeout_minutes) from err
        raise
    finally:
        logger.close()
        compat.destroy_model_parallel()
    return history
