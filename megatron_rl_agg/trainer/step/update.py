"""One optimizer update of the trainer: a mini-batch through Megatron's schedule, and its loss metrics.

:func:`run_update` takes one mini-batch of this DP rank (a ``prepare_microbatches`` input dict, built by
:mod:`megatron_rl_agg.trainer.loop.train`), computes its global aggregation weights once
(:func:`megatron_rl_agg.mcore.batch.prepare_microbatches`), runs Megatron's forward-backward schedule with
:func:`megatron_rl_agg.mcore.loss.forward_step` (or the packed THD step under ``--sequence-packing``) and
takes the optimizer step unless a non-finite term stops or skips it (:func:`.nonfinite.check_update`).
:func:`loss_metrics` reduces the loss function's reports exactly over micro-batches and DP ranks on the
last pipeline stage and hands them to every stage.

``tr`` is the run's :class:`megatron_rl_agg.trainer.loop.build.Trainer`; this module reads its ``args``,
``chunks``, ``optimizer``, ``loss_cfg``, ``layout``, ``source`` and process groups only.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from megatron_rl_agg.mcore import routing_replay
from megatron_rl_agg.mcore import compat, cpu_mode
from megatron_rl_agg.mcore import forward
from megatron_rl_agg.trainer.step.nonfinite import check_update

__all__ = ["run_update", "loss_metrics"]

# Loss-function report names exported to the metrics line (name in the report -> metrics key).
_LOSS_REPORT = (("policy_loss/sum", "policy_loss"), ("kl_loss/sum", "kl_loss"), ("entropy/mean", "entropy"),
                ("entropy_loss/sum", "entropy_loss"), ("loss/sum", "loss"), ("clip_frac/mean", "clip_frac"),
                ("ppo_kl/mean", "ppo_kl"), ("masked_frac/mean", "masked_frac"), ("num_tokens/sum", "num_tokens"))
# masked_frac: the DPPO losses' fraction of loss tokens outside the trust region (no gradient); the other
# losses mask no token, so their reports carry no masked_frac and the line reads 0 (the true fraction).
# With behaviour log-probs (--recompute-logprobs): the off-policy correction's metrics (docs/off_policy.md).
_IS_REPORT = (("mismatch_kl_k1/mean", "mismatch_kl_k1"), ("mismatch_kl_k3/mean", "mismatch_kl_k3"),
              ("is_weight/mean", "is_weight_mean"), ("is_weight/max", "is_weight_max"),
              ("is_weight/min", "is_weight_min"), ("is_truncated_frac/mean", "is_truncated_frac"),
              ("is_masked_frac/mean", "is_masked_frac"), ("is_rejected_frac/mean", "is_rejected_frac"))


def _schedule_inputs(tr, micro: list) -> tuple[list, Any, int, int]:
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


def run_update(tr, batch: dict, step: int = 0, index: int = 0) -> tuple[list, float, bool, Any]:
    """Forward-backward over the micro-batches and one optimizer step; returns (reports, grad_norm,
    applied, MoE metrics: ``load_balancing_loss`` with an aux loss, ``routing_mismatch`` (mean over MoE
    layers) and ``routing_mismatch_l<i>`` with routing replay; ``{}`` for a dense model). A non-finite loss term or gradient raises or, with
    ``--on-nonfinite skip``, drops the update (``applied`` False, grad_norm NaN): see
    :func:`.nonfinite.check_update`."""
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
    counter = routing_replay.MismatchCounter(tr.chunks) if batch.get("routes") is not None else None
    try:
        reports = get_forward_backward_func()(
            forward_step_func=step_func, data_iterator=iterator, model=tr.chunks, num_microbatches=len(micro),
            seq_length=seq_length, micro_batch_size=mbs, forward_only=False)
    finally:
        if counter is not None:
            counter.remove()
            routing_replay.clear(tr.chunks)
    aux = {}
    lb = _load_balancing_loss(tr, len(micro))
    if lb is not None:
        aux["load_balancing_loss"] = lb
    if counter is not None:        # MoE routing replay: the routing mismatch per layer, exact over ranks
        fractions = counter.fractions()
        aux["routing_mismatch"] = sum(fractions) / len(fractions)
        aux.update({f"routing_mismatch_l{i}": f for i, f in enumerate(fractions)})
    if not check_update(tr.optimizer, reports, step=step, index=index,
                               num_updates=tr.args.mini_batches_per_step, policy=tr.args.on_nonfinite,
                               source=tr.source, device=cpu_mode.device()):
        for chunk in tr.chunks:
            chunk.zero_grad_buffer()
        tr.optimizer.zero_grad()
        return reports, float("nan"), False, aux
    _, grad_norm, _ = tr.optimizer.step()
    return reports, float(grad_norm) if grad_norm is not None else float("nan"), True, aux


def _load_balancing_loss(tr, num_microbatches: int) -> Optional[float]:
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


def loss_metrics(tr, reports: list) -> dict:
    """Loss-function reports reduced over micro-batches and DP (last stage), then on every stage."""
    from megatron_rl_agg.parallel.metrics import reduce_metrics

    table = _LOSS_REPORT + (_IS_REPORT if getattr(tr.args, "recompute_logprobs", False) else ())
    reduced = reduce_metrics(reports, tr.metrics_group) if reports else None
    values = None
    if reduced is not None:
        values = torch.tensor([reduced.get(name, 0.0) for name, _ in table], dtype=torch.float64,
                              device=cpu_mode.device())
    values = forward.broadcast_from_last_stage(values, (len(table),), torch.float64)
    out = {key: float(v) for (_, key), v in zip(table, values.tolist())}
    out["num_tokens"] = int(round(out["num_tokens"]))
    return out
