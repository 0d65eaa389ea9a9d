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

Then, per mini-batch, one update (:func:`megatron_rl_agg.trainer.step.update.run_update`):
``prepare_microbatches`` (global aggregation weights, once per mini-batch), Megatron's forward-backward
schedule with :func:`megatron_rl_agg.mcore.loss.forward_step`, the optimizer step; metrics reduced exactly
over micro-batches and DP ranks, handed from the last pipeline stage to rank 0, and combined over the
mini-batches into one line per step.

This module holds the step (its mini-batches, the metrics line) and the loop (:func:`run`: steps, saves,
signals, timeouts); the run itself (model, optimizer, reference, rollout source, resume) is built by
:mod:`.build`.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import torch

from megatron_rl_agg.parallel import dist
from megatron_rl_agg.mcore import compat, cpu_mode
from megatron_rl_agg.parallel.advantages import compute_step_advantages
from megatron_rl_agg.trainer.step import batching, reference, staleness, update
from megatron_rl_agg.mcore import forward
from megatron_rl_agg.trainer.loop import checkpoint, safety
from megatron_rl_agg.trainer.loop.build import Trainer, build_trainer, model_sizes
from megatron_rl_agg.trainer.loop.reporting import METRIC_KEYS, MetricsLogger
from megatron_rl_agg.trainer.step.nonfinite import NonFiniteError

__all__ = ["train_step", "run"]


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
    step_rows = tr.source.local_rows(step, index, dp_size, dp_rank, chunks=tr.chunks)
    sums = _row_sums(step_rows, tr.dp_group)
    _check_reward_failures(tr, step, step_rows, sums)
    rows = batching.build_rows(step_rows.samples, tr.args.seq_length, step_rows.group_ids)
    rows = rows.to(cpu_mode.device())
    # Rows without a reward (timed out, raised, non-finite) are invalid: out of the statistics and the loss.
    adv, keep_row, stats = compute_step_advantages(
        rows.rewards, rows.group_ids, truncated=rows.truncated, sample_valid=rows.valid, cfg=tr.adv_cfg,
        process_group=tr.dp_group, expected_group_size=tr.source.expected_group_size)
    rows = replace(rows, loss_mask=rows.loss_mask * keep_row.unsqueeze(1).to(rows.loss_mask.dtype))
    stats.update(sums)
    if getattr(tr.source, "has_versions", False):
        # --max-staleness (drop: out of the loss mask; mask: advantage 0) and the staleness counts
        loss_mask, adv, counts = staleness.apply_max_staleness(
            rows.versions, rows.loss_mask, adv, step, tr.args.max_staleness, tr.args.staleness_mode, tr.dp_group)
        rows = replace(rows, loss_mask=loss_mask)
        stats["staleness"] = counts
    rows, adv = batching.pad_rows(rows, adv, _padded_rows(tr, rows.num_rows), dp_rank)
    batch = {"tokens": rows.tokens, "labels": rows.labels, "loss_mask": rows.loss_mask, "advantages": adv,
             "old_logprobs": rows.old_logprobs, "group_ids": rows.group_ids, "ref_logprobs": None,
             "token_mask": rows.token_mask,      # padding never counts in an MoE aux loss
             # routing replay R3: the rollout file's routes (checked against the model before step 1)
             "routes": rows.routes if getattr(tr.args, "moe_routing_replay", "off") == "r3" else None}
    if tr.ref_chunks is not None:
        batch["ref_logprobs"] = reference.reference_logprobs(tr.ref_chunks, rows.tokens, rows.labels,
                                                             tr.args.micro_batch_size,
                                                             temperature=tr.loss_cfg.temperature)
    return batch, stats


def _row_sums(step_rows, dp_group) -> dict:
    """Sums over the rows on all DP ranks (one all-reduce): reward and response length, lost samples,
    samples without a reward (``num_reward_failures``) and rows with one (``num_rewarded``)."""
    samples = step_rows.samples
    rewarded = [s for s in samples if s.reward_error is None]
    local = torch.tensor([sum(s.reward for s in rewarded), float(sum(len(s.response) for s in samples)),
                          float(step_rows.num_failed), float(len(samples) - len(rewarded)), float(len(rewarded))],
                         dtype=torch.float64, device=cpu_mode.device())
    reward_sum, length_sum, num_failed, failures, rewarded = dist.all_reduce_sum(local, dp_group).tolist()
    return {"reward_sum": reward_sum, "length_sum": length_sum, "num_failed_samples": int(num_failed),
            "num_reward_failures": int(failures), "num_rewarded": int(rewarded)}


def _check_reward_failures(tr: Trainer, step: int, step_rows, sums: dict) -> None:
    """Stop every rank when more than ``--max-reward-failure-frac`` of the mini-batch's samples has no
    reward, naming the reward, the fraction and the first failing prompt (the lowest failing global row,
    one more all-reduce on this path only, so the message is the same on every rank)."""
    failures, scored = sums["num_reward_failures"], sums["num_reward_failures"] + sums["num_rewarded"]
    limit = tr.args.max_reward_failure_frac
    if not failures or failures <= limit * scored:
        return
    rows = [int(s.source.rsplit(" ", 1)[1]) for s in step_rows.samples if s.reward_error is not None]
    mine = torch.tensor([-min(rows) if rows else -(2 ** 62)], dtype=torch.int64, device=cpu_mode.device())
    first = -int(dist.all_reduce_max(mine, tr.dp_group).item())
    raise safety.RewardFailureError(
        f"--reward {tr.args.reward}: {failures} of {scored} samples of step {step} have no reward (fraction "
        f"{failures / scored:.3g} > --max-reward-failure-frac {limit:g}: timed out after --reward-timeout "
        f"{tr.args.reward_timeout:g} s, raised, or non-finite); first failing prompt (row {first}): "
        f"{tr.source.row_prompt(step, first)!r:.200}")


def _step_batches(tr: Trainer, step: int) -> list[tuple[dict, dict]]:
    """Every mini-batch of the step, built before the first update.

    With ``--recompute-logprobs`` the file's log-probs become ``behaviour_logprobs`` and the proximal
    ``old_logprobs`` are the current model's (forward only, before any update). With several mini-batches,
    rows without behaviour log-probs get the current model's (forward only,
    before any update): the "old" policy of every mini-batch is the one that generated / precedes the
    step. With one mini-batch they stay None and the loss uses the detached log-probs of the update's own
    forward pass: the same numbers, one forward pass fewer. With ``--moe-routing-replay r2`` every
    mini-batch gets the model's log-probs AND the routes of that forward (``batch['routes']``, replayed
    in the update; docs/routing_replay.md): they are the old log-probs unless the rollouts carry them.
    """
    batches = [_local_batch(tr, step, j) for j in range(tr.args.mini_batches_per_step)]

    def model_logprobs(batch: dict) -> torch.Tensor:
        # The current model's log-probs at the sampling temperature, forward only, before any update.
        return forward.compute_logprobs(tr.chunks, batch["tokens"], batch["labels"], tr.args.micro_batch_size,
                                        temperature=tr.loss_cfg.temperature)

    replay = getattr(tr.args, "moe_routing_replay", "off") == "r2"
    for batch, _ in batches:
        if replay:
            # MoE routing replay R2: the routes of this forward (the proximal / old log-prob pass) are
            # replayed in every micro-batch of the update (mcore.routing_replay)
            logprobs, batch["routes"] = forward.compute_logprobs(
                tr.chunks, batch["tokens"], batch["labels"], tr.args.micro_batch_size,
                temperature=tr.loss_cfg.temperature, record_routes=True)
            if tr.args.recompute_logprobs:
                batch["behaviour_logprobs"], batch["old_logprobs"] = batch["old_logprobs"], logprobs
            elif batch["old_logprobs"] is None:
                batch["old_logprobs"] = logprobs
        elif tr.args.recompute_logprobs:
            # Decoupled PPO: the file's log-probs are the behaviour policy's, the model's the proximal ones.
            batch["behaviour_logprobs"], batch["old_logprobs"] = batch["old_logprobs"], model_logprobs(batch)
        elif tr.args.mini_batches_per_step > 1 and batch["old_logprobs"] is None:
            batch["old_logprobs"] = model_logprobs(batch)
    return batches


_SUMMED = ("num_groups", "num_partial_groups", "num_dropped_groups", "num_truncated", "num_rows",
           "num_stat_rows", "num_failed_samples", "num_reward_failures", "num_rewarded", "num_tokens",
           "num_skipped_updates")


def _combine(parts: list[dict]) -> dict:
    """One metrics line from the mini-batches of a step: counts summed, reward and response length over
    all rows, every loss term and the grad norm averaged over the mini-batches; the staleness metrics
    from the summed counts."""
    stale = [p.pop("staleness") for p in parts if "staleness" in p]
    out = {key: sum(p[key] for p in parts) for key in _SUMMED}
    rows = max(out["num_rows"], 1)
    # over the rows that have a reward (rows whose reward failed have none)
    out["reward_mean"] = sum(p["reward_sum"] for p in parts) / max(out.pop("num_rewarded"), 1)
    out["response_length"] = sum(p["length_sum"] for p in parts) / rows
    averaged = [k for k in parts[0] if k not in _SUMMED and k not in ("reward_sum", "length_sum")]
    out.update({key: sum(p[key] for p in parts) / len(parts) for key in averaged})
    for key in averaged:     # extremes stay extremes (is_weight_max / is_weight_min)
        if key.endswith("_max") or key.endswith("_min"):
            out[key] = (max if key.endswith("_max") else min)(p[key] for p in parts)
    if stale:            # rows with policy versions: exact over the mini-batches (counts summed)
        out.update(staleness.combine_staleness(stale))
    return out


def train_step(tr: Trainer, step: int) -> dict:
    """Run step ``step`` (1-based): ``--mini-batches-per-step`` optimizer updates; returns its metrics line
    (identical on every rank)."""
    start = time.perf_counter()
    for chunk in tr.chunks:
        chunk.train()
    parts = []
    for index, (batch, stats) in enumerate(_step_batches(tr, step)):
        reports, grad_norm, applied, aux = update.run_update(tr, batch, step, index)
        part = {**update.loss_metrics(tr, reports), "grad_norm": grad_norm,
                "num_skipped_updates": int(not applied), **stats}
        part.update(aux)             # MoE: load_balancing_loss, routing_mismatch (update.run_update)
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
             "model": model_sizes(tr.args)}
    checkpoint.save_checkpoint(tr.args.save, step, tr.chunks, tr.optimizer, state, rank=tr.rank,
                               world_size=tr.world_size)


def _save_hf(tr: Trainer) -> None:
    from megatron_rl_agg.trainer.loop.hf_model import save_hf

    save_hf(tr.chunks, tr.args)


def _export_for_engine(tr: Trainer, out_dir: str) -> None:
    from megatron_rl_agg.trainer.loop.hf_model import save_hf

    save_hf(tr.chunks, tr.args, out_dir=out_dir)


def run(args: argparse.Namespace) -> list[dict]:
    """Train from ``args`` (see :mod:`.arguments`); returns every step's metrics (on every rank).

    Re-entrant: tears down Megatron's model-parallel state at the end, so one process can run several
    layouts one after another (the tests do). SIGINT / SIGTERM stop it after the current step (saved to
    ``--save`` with ``--save-on-interrupt``, the default); a collective that exceeds
    ``--distributed-timeout-minutes`` raises :class:`.safety.DistributedTimeoutError`.
    """
    tr = build_trainer(args)
    if tr.start_step >= args.train_iters:
        try:
            if args.save_hf and tr.start_step == args.train_iters:
                # The conversion: --train-iters 0 from --hf-checkpoint, or --load CKPT at its saved step.
                _save_hf(tr)
                if tr.rank == 0:
                    source = f"--load {args.load} (step {tr.start_step})" if args.load else \
                        f"--hf-checkpoint {args.hf_checkpoint}"
                    print(f"[megatron_rl_agg] exported {source} to {args.save_hf} without training")
            elif tr.rank == 0:
                print(f"[megatron_rl_agg] nothing to train: --load {args.load} is at step {tr.start_step} and "
                      f"--train-iters is {args.train_iters}; raise --train-iters to continue")
        finally:
            _close_source(tr)
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
                if hasattr(tr.source, "after_step"):       # an inference engine: sync its weights
                    metrics.update(tr.source.after_step(step, tr.chunks,
                                                        lambda out: _export_for_engine(tr, out)))
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
                if args.save_hf:         # after the last step
                    _save_hf(tr)
    except RuntimeError as err:
        if safety.is_timeout(err) and not isinstance(err, NonFiniteError):
            raise safety.describe_timeout(err, args.distributed_timeout_minutes) from err
        raise
    finally:
        logger.close()
        _close_source(tr)
        compat.destroy_model_parallel()
    return history


def _close_source(tr: Trainer) -> None:
    """Stop the rollout source's reward workers (on every exit path of :func:`run`)."""
    close = getattr(tr.source, "close", None)
    if close is not None:
        close()
