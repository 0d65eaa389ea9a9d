"""Exact reduction of the loss function's per-micro-batch reports over micro-batches and DP ranks.

The suffix rule (``/sum``, ``/mean``, ``/max``, ``/min``) is :mod:`megatron_rl_agg.core.metrics`. This module
issues at most two collectives per call (one sum; one max only when a ``/max`` or ``/min`` name exists)
through :mod:`megatron_rl_agg.parallel.dist`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from megatron_rl_agg.core.metrics import METRIC_REDUCTIONS, _stack, common_names, reduction_of
from megatron_rl_agg.parallel import dist

__all__ = ["reduce_metrics"]


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
    names = common_names(reports, "micro-batch report", "names")
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
