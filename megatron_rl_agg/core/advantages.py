"""Outcome-reward advantages normalized over the real prompt groups, exact across data-parallel ranks.

Notation (one optimizer step, all DP ranks together):

* ``r_i``  scalar reward of row ``i``; ``v_i`` in {0, 1}: row ``i`` enters the statistics (valid).
* ``g(i)`` the prompt group of row ``i``; ``V_g`` the valid rows of group ``g``, ``n_g = |V_g|``;
  ``V`` all valid rows of the batch, ``N = |V|``.
* level ``group``: ``mean_g = sum_{j in V_g} r_j / n_g``, ``M2_g = sum_{j in V_g} (r_j - mean_g)^2``,
  ``std_g = sqrt(M2_g / (n_g - 1))`` (``/ n_g`` when ``unbiased=False``). Level ``batch``: the same over
  ``V``. The std of a level is always the spread of the raw rewards around that level's own mean, whatever
  ``mean_level`` is (so group mean / batch std is ``(r_i - mean_g) / (std_batch + eps)``, LitePPO).

Advantage of a valid row (``mu``/``n_mu``: mean and count at ``mean_level``; ``sigma`` std at ``std_level``):

==============  ==============================  =====================================================
mean_level      numerator ``a_i``               with ``leave_one_out`` (baseline = other valid rows)
==============  ==============================  =====================================================
group / batch   ``r_i - mu``                    ``r_i - (n_mu mu - r_i) / (n_mu - 1)``
                                                ``= n_mu / (n_mu - 1) * (r_i - mu)``
none            ``r_i``                         (error: there is no baseline to leave out)
==============  ==============================  =====================================================

``A_i = a_i / (sigma + eps)``, or ``A_i = a_i`` when ``std_level="none"``. With ``leave_one_out`` only the
baseline changes: ``sigma`` is still the std of *all* the valid rows of the level, row ``i`` included.

``A_i = 0`` (never NaN, never ``x / eps``) when any of these holds:

1. row ``i`` is not valid (or, in :func:`compute_step_advantages`, its group was dropped);
2. a level is ``group`` and ``n_{g(i)} < 2``: one sample has no peer to be compared with;
3. a level is ``batch`` and ``N < 2``;
4. ``std_level`` is not ``none`` and ``sigma == 0`` exactly (every valid reward of the level is equal):
   there is no spread to scale by, and ``a_i / eps`` would only amplify rounding or a constant offset.

With ``mean_level = std_level = "none"`` the advantage is the raw reward of the valid rows (no statistics,
so rules 2-4 do not apply).

Numerics: float64 throughout; per bucket the mean is kept as ``ref + delta`` (``ref`` the largest valid
reward, ``delta`` the mean of ``r - ref``) and ``M2`` is a centered second pass, so a large common offset
cancels before any sum and never enters a square, and equal rewards give ``sigma == 0`` bit-exactly
(rule 4); the advantage of a row is its centered value ``(r - ref) - delta`` from that second pass times
its group's scale. All reductions are vectorized segment reductions (``unique_consecutive``,
``index_add_``, ``segment_reduce``, ``scatter_reduce_``): no Python loop over groups or rows.

This module is the math of one process (per-bucket moments, their merge, the coefficients of a group);
:mod:`megatron_rl_agg.parallel.advantages` exchanges the buckets between ranks and is the public API
(:func:`~megatron_rl_agg.parallel.advantages.normalize_advantages`, :func:`~megatron_rl_agg.parallel.advantages.compute_step_advantages`).
"""

from __future__ import annotations

import math

import torch


__all__ = ["NORM_LEVELS", "MAX_ABS_REWARD"]

NORM_LEVELS = ("group", "batch", "none")
_OVERLONG_POLICIES = ("keep", "zero_advantage", "mask")

# Columns of the per-(rank, group) bucket table exchanged between ranks. Everything is int64 so that a
# single all-gather carries both exact integer ids/counts and float64 statistics: the float columns are
# the IEEE bit patterns (Tensor.view(torch.int64)), which a gather copies without touching.
# Largest accepted |reward|: squares of deviations stay far below float64's 1.8e308.
MAX_ABS_REWARD = 1e150

_RANK, _ID, _ROWS, _NSTAT, _USABLE, _TRUNC, _NBAD, _REF, _DELTA, _M2 = range(10)


# Validation
# ----------------------------------------------------------------------------------------------

def _check_rewards(rewards) -> int:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        desc = (f"{rewards.dtype} tensor of shape {list(rewards.shape)}" if isinstance(rewards, torch.Tensor)
                else type(rewards).__name__)
        raise ValueError(f"rewards must be a 1-D floating tensor [B]; got {desc}")
    return rewards.shape[0]


def _bool_rows(mask, n_rows, name, *, default: bool, like) -> torch.Tensor:
    if mask is None:
        return torch.full((n_rows,), default, dtype=torch.bool, device=like.device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor of shape [B]; got "
                         f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if tuple(mask.shape) != (n_rows,):
        raise ValueError(f"{name} must have shape [B] = [{n_rows}] like rewards; got {list(mask.shape)}")
    return mask.to(like.device)


def _as_sizes(group_sizes) -> torch.Tensor:
    if isinstance(group_sizes, torch.Tensor):
        if group_sizes.dim() != 1 or group_sizes.is_floating_point() or group_sizes.dtype == torch.bool:
            raise ValueError(f"group_sizes must be a 1-D integer tensor or a sequence of ints; got "
                             f"{group_sizes.dtype} of shape {list(group_sizes.shape)}")
        return group_sizes.to("cpu", torch.int64)
    values = list(group_sizes)
    try:
        sizes = torch.tensor(values)
    except (TypeError, ValueError, RuntimeError):
        sizes = None
    if sizes is None or sizes.dim() != 1 or sizes.dtype != torch.int64:  # floats, bools, nested, objects
        bad = [(k, v) for k, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, int)]
        raise ValueError(f"group_sizes must be ints; got (index, value) {bad[:10]}")
    return sizes


# ----------------------------------------------------------------------------------------------
# Computation
# ----------------------------------------------------------------------------------------------

def _segment_moments(r, ok, inv, lengths):
    """Per-segment ``(n, ref, delta, M2)`` of ``r[ok]`` in float64, without sum-of-squares cancellation,
    and the centered rows ``c [B]``.

    Segments are runs of consecutive rows (``lengths``; ``inv`` maps rows to segments). ``ref`` is the
    largest valid value of the segment and ``delta = mean - ref = sum(x - ref) / n`` (shifted data): a
    common offset cancels exactly in ``x - ref`` before anything is summed, the mean is never rounded to
    the offset's precision, and a segment whose values are all equal gets ``delta == 0`` and ``M2 == 0``
    bit-exactly. ``c = (x - ref) - delta`` on valid rows (0 elsewhere, whatever ``r`` holds there) and
    ``M2 = sum c^2`` is the centered second pass; ``c`` times a segment's scale is its advantage.
    """
    f64 = torch.float64
    n_seg = lengths.numel()
    okf = ok.to(f64)
    n = torch.zeros(n_seg, dtype=f64, device=r.device).index_add_(0, inv, okf)
    # segment_reduce needs every segment non-empty (true: a segment is a run of >= 1 rows)
    if n_seg:
        ref = torch.segment_reduce(torch.where(ok, r, -math.inf), "max", lengths=lengths)
    else:
        ref = r.new_zeros(0)
    ref = torch.where(n > 0, ref, 0.0)
    shifted = torch.where(ok, r - ref.index_select(0, inv), 0.0)
    delta = torch.zeros(n_seg, dtype=f64, device=r.device).index_add_(0, inv, shifted) / n.clamp(min=1)
    centered = shifted.sub_(delta.index_select(0, inv)).mul_(okf)  # in place: 1M-row temporaries add up
    m2 = torch.zeros(n_seg, dtype=f64, device=r.device).index_add_(0, inv, centered * centered)
    return n.round().long(), ref, delta, m2, centered


def _merge_moments(n_b, ref_b, delta_b, m2_b, idx, n_out):
    """Chan's parallel merge of bucket moments into ``n_out`` groups by ``idx`` (same ``(n, ref, delta, M2)``
    form as :func:`_segment_moments`; the buckets of one group need not be adjacent).

    With ``ref`` the largest bucket ``ref`` of the group and ``s_b = (ref_b - ref) + delta_b`` the bucket
    mean relative to it: ``delta = sum_b n_b s_b / n`` and ``M2 = sum_b [M2_b + n_b (s_b - delta)^2]``, the
    exact identity ``sum_{x in g}(x - mean)^2 = sum_b [sum_{x in b}(x - mean_b)^2 + n_b (mean_b - mean)^2]``
    with only centered (small) quantities squared.
    """
    f64 = torch.float64
    dev = n_b.device
    n = torch.zeros(n_out, dtype=torch.int64, device=dev).index_add_(0, idx, n_b)
    ref = torch.full((n_out,), -math.inf, dtype=f64, device=dev)
    ref.scatter_reduce_(0, idx, torch.where(n_b > 0, ref_b, -math.inf), reduce="amax", include_self=True)
    ref = torch.where(n > 0, ref, 0.0)
    nf = n_b.to(f64)
    # empty buckets (n_b = 0) carry ref_b = delta_b = M2_b = 0 and add nothing below
    s_b = torch.where(n_b > 0, (ref_b - ref[idx]) + delta_b, 0.0)
    delta = torch.zeros(n_out, dtype=f64, device=dev).index_add_(0, idx, nf * s_b) / n.clamp(min=1).to(f64)
    m2 = torch.zeros(n_out, dtype=f64, device=dev).index_add_(0, idx, m2_b + nf * (s_b - delta[idx]) ** 2)
    return n, ref, delta, m2


def _as_bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int64)


def _from_bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.float64)


def _raise_non_finite(bad_ranks, bad_row, my_rank):
    if bad_ranks:
        here = [] if bad_row is None else torch.nonzero(bad_row).flatten().tolist()
        where_here = f"; on this rank (rank {my_rank}) rows {here[:20]}" if here else ""
        raise ValueError(f"rewards must be finite on valid rows, with |r| <= {MAX_ABS_REWARD:g}: other "
                         f"values on rank(s) {bad_ranks}{where_here}. Mark failed samples invalid instead of "
                         "passing NaN/inf; rescale rewards of larger magnitude (the advantages are scale-free).")


def _group_coefficients(group, kept_g, batch, *, mean_level, std_level, eps, unbiased, leave_one_out):
    """Per-group ``(ref, delta, mult)`` with ``A_i = ((r_i - ref) - delta) * mult`` for the valid rows of the
    group (``ref``/``delta`` are 0-d at mean_level batch and unused at none), i.e. the formula of the module
    docstring with ``mult = [n/(n-1) if leave_one_out] / (sigma + eps)``, and ``mult = 0`` where a rule
    gives 0 (dropped group, < 2 valid rows at a used level, zero spread)."""
    f64 = torch.float64
    levels = {"group": group, "batch": tuple(t[0] for t in batch)}
    zero = ~kept_g
    for level in {mean_level, std_level} - {"none"}:
        zero = zero | (levels[level][0] < 2)
    mult = torch.ones_like(group[1])
    ref = delta = None
    if mean_level != "none":
        cnt, ref, delta, _ = levels[mean_level]
        if leave_one_out:
            # r - (n mean - r)/(n - 1) = n/(n - 1) (r - mean): centered, so offsets stay out of the sums.
            cntf = cnt.to(f64)
            mult = mult * (cntf / (cntf - 1).clamp(min=1))
    if std_level != "none":
        cnt, _, _, m2 = levels[std_level]
        sigma = torch.sqrt(m2 / (cnt - (1 if unbiased else 0)).clamp(min=1).to(f64))
        zero = zero | (sigma == 0)
        mult = mult / (sigma + eps)
    return ref, delta, torch.where(zero, 0.0, mult)
