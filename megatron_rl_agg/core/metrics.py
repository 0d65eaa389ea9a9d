"""Exact reduction of the loss function's per-micro-batch reports over micro-batches and DP ranks.

Every metric name ends in its reduction, so the reducer never guesses:

==========  ====================================  ===========================================
suffix      per-micro-batch value                 reduced value (micro-batches x DP ranks)
==========  ====================================  ===========================================
``/sum``    0-d tensor, a partial sum             sum of all partial sums
``/mean``   ``[2]`` tensor ``(sum, count)``       ``sum(sums) / max(sum(counts), 1)``
``/max``    0-d tensor                            maximum
``/min``    0-d tensor                            minimum
==========  ====================================  ===========================================

``/mean`` therefore gives the true mean over every counted item (e.g. every loss token of the
mini-batch), not a mean of micro-batch means, and a mean over nothing is 0 (never NaN). ``/sum`` values
are pre-weighted partial sums: for ``policy_loss/sum`` each micro-batch reports ``sum(w * pg)`` with the
global weights ``w``, so the total is exactly the aggregated objective of the whole mini-batch:

    reported = sum_{ranks, micro-batches} sum_t w_t * pg_t = aggregate(pg, whole mini-batch)

The ``(sum, count)`` pairs are also the shape Megatron-LM's own training loop sums and divides.
This module issues at most two collectives per call (one sum; one max only when a ``/max`` or ``/min``
name exists) through :mod:`megatron_rl_agg.parallel.dist`; it never imports ``torch.distributed`` itself.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from megatron_rl_agg.parallel import dist

__all__ = ["METRIC_REDUCTIONS", "reduction_of", "reduce_metrics", "average_over_minibatches"]

METRIC_REDUCTIONS = ("sum", "mean", "max", "min")


def reduction_of(name: str) -> str:
    """The reduction a metric name carries (its last ``/`` component); a ValueError names the valid ones."""
    suffix = name.rsplit("/", 1)[-1] if "/" in name else ""
    if suffix not in METRIC_REDUCTIONS:
        raise ValueError(f"metric {name!r} must end in one of "
                         f"{', '.join('/' + r for r in METRIC_REDUCTIONS)}")
    return suffix


def _stack(reports: Sequence[Mapping[str, torch.Tensor]], name: str) -> torch.Tensor:
    values = [torch.as_tensor(r[name]).detach().to(torch.float64) for r in reports]
    shape = (2,) if reduction_of(name) == "mean" else ()
    for v in values:
        if tuple(v.shape) != shape:
            raise ValueError(f"metric {name!r} must be a tensor of shape {shape}, got {tuple(v.shape)}")
    return torch.stack(values)


def reduce_metrics(reports: Sequence[Mapping[str, torch.Tensor]], process_group=None) -> dict[str, float]:
    """Reduce per-micro-batch reports over the micro-batches and the ranks of ``process_group``.

    Args:
        reports: one dict per micro-batch (what the loss function returned as its second element; on a
            pipeline-parallel run only the last stage has them). Every dict, on every rank, must carry
            the same names.
        process_group: the data-parallel group (None: this process only, no collective).

    Returns:
        ``{name: float}``, same names, reduced as their suffix says. An empty ``reports`` gives ``{}`` and
        issues no collective (the first pipeline stages have nothing to reduce).
    """
    if not reports:
        return {}
    names = sorted(reports[0])
    for i, r in enumerate(reports):
        if sorted(r) != names:
            raise ValueError(f"micro-batch report {i} has names {sorted(r)}, report 0 has {names}")
    by_kind = {kind: [n for n in names if reduction_of(n) == kind] for kind in METRIC_REDUCTIONS}

    # One all-reduce(sum) carries every /sum value and every (sum, count) pair ...
    sums = [_stack(reports, n).sum(0).reshape(-1) for n in by_kind["sum"] + by_kind["mean"]]
    # Every rank carries the same names, so skipping an empty collective is skipped on all ranks alike.
    flat_sum = dist.all_reduce_sum(torch.cat(sums), process_group) if sums else None
    # ... and one all-reduce(max) every /max value and every negated /min value (min x = -max -x).
    peaks = [_stack(reports, n).max(0).values.reshape(1) for n in by_kind["max"]]
    peaks += [(-_stack(reports, n)).max(0).values.reshape(1) for n in by_kind["min"]]
    flat_max = dist.all_reduce_max(torch.cat(peaks), process_group) if peaks else None

    out: dict[str, float] = {}
    pos = 0
    for n in by_kind["sum"]:
        out[n] = float(flat_sum[pos])
        pos += 1
    for n in by_kind["mean"]:
        total, count = flat_sum[pos], flat_sum[pos + 1]
        out[n] = float(total / count.clamp(min=1))
        pos += 2
    for i, n in enumerate(by_kind["max"]):
        out[n] = float(flat_max[i])
    for i, n in enumerate(by_kind["min"], start=len(by_kind["max"])):
        out[n] = float(-flat_max[i])
    return out


def average_over_minibatches(per_minibatch: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combine the reduced metrics of several mini-batches (optimizer steps) of one training step.

    Each mini-batch counts once: ``/sum`` and ``/mean`` values are averaged (e.g. the mean policy
    objective over the PPO epochs' steps), ``/max`` and ``/min`` keep the extreme.
    """
    if not per_minibatch:
        return {}
    names = sorted(per_minibatch[0])
    for i, d in enumerate(per_minibatch):
        if sorted(d) != names:
            raise ValueError(f"mini-batch {i} has metrics {sorted(d)}, mini-batch 0 has {names}")
    out: dict[str, float] = {}
    for n in names:
        values = [float(d[n]) for d in per_minibatch]
        kind = reduction_of(n)
        if kind == "max":
            out[n] = max(values)
        elif kind == "min":
            out[n] = min(values)
        else:
            out[n] = sum(values) / len(values)
    return out
