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
This module is the per-process part (the suffix rule, the mean over mini-batches);
:func:`megatron_rl_agg.parallel.metrics.reduce_metrics` reduces the reports over micro-batches and ranks.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


__all__ = ["METRIC_REDUCTIONS", "reduction_of", "average_over_minibatches"]

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


def common_names(dicts: Sequence[Mapping[str, object]], item: str, kind: str) -> list[str]:
    """The sorted names shared by every dict of a non-empty list; a ValueError names the first that differs
    (``"<item> i has <kind> [...], <item> 0 has [...]"``)."""
    names = sorted(dicts[0])
    for i, d in enumerate(dicts):
        if sorted(d) != names:
            raise ValueError(f"{item} {i} has {kind} {sorted(d)}, {item} 0 has {names}")
    return names


def average_over_minibatches(per_minibatch: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combine the reduced metrics of several mini-batches (optimizer steps) of one training step.

    Each mini-batch counts once: ``/sum`` and ``/mean`` values are averaged (e.g. the mean policy
    objective over the PPO epochs' steps), ``/max`` and ``/min`` keep the extreme.
    """
    if not per_minibatch:
        return {}
    names = common_names(per_minibatch, "mini-batch", "metrics")
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
