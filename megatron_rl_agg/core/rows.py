"""Rows of a batch: their data-parallel shards and their padding (pure torch).

A batch tensor's first dimension is its rows (one sequence each); padding appends rows filled with one
value, of the tensor's dtype and device, so that every data-parallel rank or micro-batch holds the same
number of rows. What a padding row means (a zero loss mask, a reserved group id) is the caller's fill.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["pad_rows_to", "shard_bounds"]


def pad_rows_to(t: Optional[torch.Tensor], n_rows: int, fill=0) -> Optional[torch.Tensor]:
    """``t`` (``[R, ...]``) with ``n_rows - R`` rows of ``fill`` appended: ``[n_rows, ...]``, same dtype and
    device. ``t`` itself when it already has ``n_rows`` rows; None stays None."""
    if t is None or t.shape[0] == n_rows:
        return t
    pad = t.new_full((n_rows - t.shape[0],) + tuple(t.shape[1:]), fill)
    return torch.cat([t, pad], dim=0)


def shard_bounds(num_rows: int, dp_size: int, dp_rank: int) -> tuple[int, int]:
    """Row range ``[start, end)`` of data-parallel rank ``dp_rank``: contiguous, sizes differ by <= 1.

    The first ``num_rows % dp_size`` ranks take one extra row. A prompt group may straddle two ranks;
    the aggregation weights handle that through the global group ids.
    """
    base, extra = divmod(num_rows, dp_size)
    start = dp_rank * base + min(dp_rank, extra)
    return start, start + base + (1 if dp_rank < extra else 0)
