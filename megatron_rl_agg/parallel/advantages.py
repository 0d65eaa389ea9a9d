"""Group-normalized advantages of one optimizer step, exact across data-parallel ranks.

The formulas, the zero rules and the numerics are :mod:`megatron_rl_agg.core.advantages`; this module is
the public API and the exchange between ranks.

Distributed: each rank summarizes its rows per group bucket as ``(id, counts, ref, mean - ref, M2)``.
Groups are contiguous, so when the ids ascend along the global row order (the trainer's prompt indices)
only a rank's first and last bucket can belong to a group that continues on another rank: ONE
:func:`megatron_rl_agg.parallel.dist.all_gather_fixed` of a fixed-size record per rank (those two buckets and a
few per-rank sums, :func:`boundary_record_width` int64) gives every rank what it needs, O(ranks) bytes
whatever the number of groups; boundary buckets of one group are merged with Chan's pairwise formula, so
each group's statistics cover all its rows on all ranks (a group may span any number of ranks). Ids in
any other order fall back, identically on every rank, to :func:`megatron_rl_agg.parallel.dist.all_gather_varlen`
of every bucket (two collectives, O(groups) bytes). All the validation of ids and rewards that depends
on other ranks' data happens after an exchange, identically on every rank, so a bad batch raises the
same error everywhere instead of leaving some ranks waiting in a collective.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from megatron_rl_agg.core.advantages import (
    _DELTA, _ID, _M2, _NBAD, _NSTAT, _OVERLONG_POLICIES, _RANK, _REF, _ROWS, _TRUNC, _USABLE, MAX_ABS_REWARD,
    NORM_LEVELS, _as_bits, _as_sizes, _bool_rows, _check_rewards, _from_bits, _group_coefficients,
    _merge_moments, _raise_non_finite, _segment_moments,
)
from megatron_rl_agg.parallel import dist
from megatron_rl_agg.core.validate import positive_int

if TYPE_CHECKING:  # the config is read by attribute only; importing it here would couple the two modules
    from megatron_rl_agg.core.config import AdvantageConfig

__all__ = ["normalize_advantages", "compute_step_advantages", "boundary_record_width"]

# Columns of the fixed-size record each rank sends in the boundary exchange (int64, floats as bits):
# the packed flags, four per-rank sums, its first and its last bucket (_B_* columns each), then either one
# (expected_group_size given) or two partial-group columns, and, when a level is "batch", the moments of
# its interior kept groups.
_X_FLAGS, _X_ROWS, _X_TRUNC, _X_DROPPED, _X_STATROWS, _X_FIRST = range(6)
_B_ID, _B_N, _B_USABLE, _B_REF, _B_DELTA, _B_M2 = range(6)
_X_LAST = _X_FIRST + 6
_X_PARTIAL = _X_LAST + 6


def boundary_record_width(*, batch_level: bool, expected_group_size_known: bool) -> int:
    """int64 columns of one rank's boundary-exchange record: ``17 + (1 or 2) + (4 if batch level)``.

    Each rank receives ``W`` records: ``8 W x width`` bytes per call of :func:`normalize_advantages` /
    :func:`compute_step_advantages`, whatever the number of groups or rows.
    """
    return _X_PARTIAL + (1 if expected_group_size_known else 2) + (4 if batch_level else 0)


def normalize_advantages(
    rewards: torch.Tensor,
    *,
    group_sizes: Optional[Union[Sequence[int], torch.Tensor]] = None,
    group_ids: Optional[torch.Tensor] = None,
    valid: Optional[torch.Tensor] = None,
    mean_level: str = "group",
    std_level: str = "group",
    eps: float = 1e-6,
    unbiased: bool = True,
    leave_one_out: bool = False,
    process_group=None,
) -> torch.Tensor:
    """Normalize scalar rewards into advantages over the real prompt groups (see the module docstring).

    Args:
        rewards: ``[B]`` float, this rank's rows. Rows of ``valid=False`` may hold any value (NaN
            included): they are never read.
        group_sizes: ints summing to ``B``, the sizes of consecutive groups (single process only).
        group_ids: ``[B]`` int, the prompt group of each row. Rows of one group are contiguous within a
            rank; a group may continue from the end of one rank's rows to the start of the next rank's.
        valid: ``[B]`` bool, rows that enter the statistics; the others get advantage 0. Default all.
        mean_level, std_level: ``"group"``, ``"batch"`` or ``"none"`` each.
        eps: added to the std, ``>= 0``.
        unbiased: std with ``n - 1`` (default) or ``n`` in the denominator.
        leave_one_out: baseline = mean of the other valid rows of the level (RLOO).
        process_group: the data-parallel group the rows are spread over; None = this process holds the
            whole batch. Every rank of the group must call this function (one all-gather; see the
            module docstring).

    Returns:
        ``[B]`` advantages in the dtype of ``rewards``. Statistics are computed in float64.
    """
    rewards, seg, valid = _prepare(
        rewards, group_sizes, group_ids, valid, mean_level, std_level, eps, leave_one_out, process_group)
    adv, _, _ = _normalize_core(rewards, seg, valid, usable=None, truncated=None, mean_level=mean_level,
                                std_level=std_level, eps=eps, unbiased=unbiased, leave_one_out=leave_one_out,
                                min_valid=0, process_group=process_group, need_kept_row=False)
    return adv



def compute_step_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    truncated: Optional[torch.Tensor],
    sample_valid: Optional[torch.Tensor] = None,
    cfg: "AdvantageConfig",
    process_group=None,
    expected_group_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """The trainer's advantage step: overlong policy, group dropping and normalization in one gather.

    Args:
        rewards: ``[B]`` float, this rank's rows.
        group_ids: ``[B]`` int, as in :func:`normalize_advantages` (groups may straddle ranks).
        truncated: ``[B]`` bool, rows that ended without EOS (None: no row was truncated).
        sample_valid: ``[B]`` bool, False for failed samples (no usable reward); default all True.
        cfg: an :class:`~megatron_rl_agg.core.config.AdvantageConfig`; its fields ``adv_estimator``,
            ``mean_level``, ``std_level``, ``leave_one_out``, ``eps``, ``unbiased_std``,
            ``overlong_policy`` and ``min_valid_group_size`` are used.
        process_group: the data-parallel group; None = single process.
        expected_group_size: samples drawn per prompt (``n``); when given, a group is partial if it has
            fewer usable rows than this, otherwise fewer than the largest group of the step.

    Policies. A row is *stat-valid* when ``sample_valid`` and not excluded by ``overlong_policy``:

    * ``keep``: truncated rows are ordinary rows.
    * ``zero_advantage``: truncated rows are left out of the statistics and get advantage 0, but stay
      in the loss (``loss_row_mask`` True) so their tokens still count in the loss denominators.
    * ``mask``: truncated rows are left out of the statistics and of the loss.

    A group with fewer than ``min_valid_group_size`` stat-valid rows (counted over all ranks) is
    dropped: it enters no statistic (batch level included), its rows get advantage 0 and
    ``loss_row_mask`` False. With the default 1, this drops exactly the groups with no stat-valid row.

    Returns:
        ``(advantages [B], loss_row_mask [B] bool, stats)``. ``loss_row_mask`` = ``sample_valid`` and
        group kept and not (truncated under ``mask``). ``stats`` (global over ranks, Python ints):
        ``num_groups``, ``num_partial_groups``, ``num_dropped_groups``, ``num_truncated`` (rows flagged
        truncated), ``num_rows``, ``num_stat_rows`` (rows that entered the statistics).
    """
    # AdvantageConfig.__post_init__ has already turned adv_estimator into explicit levels and
    # leave_one_out (explicit settings override the estimator's); _prepare validates them.
    mean_level, std_level, leave_one_out = cfg.mean_level, cfg.std_level, bool(cfg.leave_one_out)
    policy = cfg.overlong_policy
    if policy not in _OVERLONG_POLICIES:
        raise ValueError(f"overlong_policy must be one of {', '.join(_OVERLONG_POLICIES)}; got {policy!r}")
    min_valid = cfg.min_valid_group_size
    positive_int(min_valid, "min_valid_group_size", must="an int >= 1")
    positive_int(expected_group_size, "expected_group_size", must="an int >= 1 or None", optional=True)
    if group_ids is None:
        raise ValueError("compute_step_advantages needs group_ids ([B] int64): groups are never inferred")

    n_rows = _check_rewards(rewards)
    truncated = _bool_rows(truncated, n_rows, "truncated", default=False, like=rewards)
    sample_valid = _bool_rows(sample_valid, n_rows, "sample_valid", default=True, like=rewards)
    stat_valid = sample_valid if policy == "keep" else sample_valid & ~truncated

    rewards, seg, stat_valid = _prepare(
        rewards, None, group_ids, stat_valid, mean_level, std_level, cfg.eps, leave_one_out, process_group)
    adv, kept_row, stats = _normalize_core(
        rewards, seg, stat_valid, usable=sample_valid, truncated=truncated,
        mean_level=mean_level, std_level=std_level, eps=cfg.eps, unbiased=bool(cfg.unbiased_std),
        leave_one_out=leave_one_out, min_valid=min_valid, process_group=process_group,
        expected_group_size=expected_group_size)
    loss_row_mask = sample_valid & kept_row
    if policy == "mask":
        loss_row_mask = loss_row_mask & ~truncated
    return adv, loss_row_mask, stats



def _prepare(rewards, group_sizes, group_ids, valid, mean_level, std_level, eps, leave_one_out,
             process_group):
    """Check every argument. Returns ``(rewards, (seg_ids [S], row->segment [B], segment lengths [S]),
    valid [B] bool)``: a segment is a run of consecutive rows of one group on this rank."""
    n_rows = _check_rewards(rewards)
    for name, level in (("mean_level", mean_level), ("std_level", std_level)):
        if level not in NORM_LEVELS:
            raise ValueError(f"{name} must be one of {', '.join(NORM_LEVELS)}; got {level!r}")
    if leave_one_out and mean_level == "none":
        raise ValueError("leave_one_out=True needs a baseline: mean_level must be 'group' or 'batch', "
                         "got 'none'")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    valid = _bool_rows(valid, n_rows, "valid", default=True, like=rewards)
    if group_sizes is not None and group_ids is not None:
        raise ValueError("pass either group_sizes or group_ids, not both")
    device = rewards.device

    if group_sizes is not None:
        if dist.world_size(process_group) > 1:
            raise ValueError("group_sizes describes the groups of one process; with a process_group of "
                             f"{dist.world_size(process_group)} ranks pass group_ids (groups may straddle "
                             "ranks)")
        sizes = _as_sizes(group_sizes)
        if (sizes <= 0).any():
            bad = torch.nonzero(sizes <= 0).flatten()[:10].tolist()
            raise ValueError(f"group_sizes must all be >= 1; got (index, size) "
                             f"{[(k, int(sizes[k])) for k in bad]}")
        if int(sizes.sum()) != n_rows:
            raise ValueError(f"group_sizes sum to {int(sizes.sum())} but rewards has B = {n_rows} rows")
        sizes = sizes.to(device)
        seg_ids = torch.arange(sizes.numel(), dtype=torch.int64, device=device)
        return rewards, (seg_ids, torch.repeat_interleave(seg_ids, sizes), sizes), valid

    if group_ids is not None:
        if not isinstance(group_ids, torch.Tensor) or group_ids.dtype in (torch.bool,) \
                or group_ids.is_floating_point() or group_ids.is_complex():
            raise ValueError("group_ids must be an integer tensor [B]; got "
                             f"{group_ids.dtype if isinstance(group_ids, torch.Tensor) else type(group_ids)}")
        if tuple(group_ids.shape) != (n_rows,):
            raise ValueError(f"group_ids must have shape [B] = [{n_rows}] like rewards; got "
                             f"{list(group_ids.shape)}")
        # unique_consecutive gives one segment per run of equal ids. A group split into two runs on one
        # rank yields two segments with the same id, which the post-gather check reports on every rank.
        seg = torch.unique_consecutive(group_ids.to(device=device, dtype=torch.int64), return_inverse=True,
                                       return_counts=True)
        return rewards, seg, valid

    if "group" in (mean_level, std_level):
        raise ValueError(f"mean_level={mean_level!r}, std_level={std_level!r} needs the real groups: pass "
                         "group_sizes or group_ids (there is no fixed-stride fallback)")
    # Batch-only levels: one bucket per rank, all with the same id so that they merge into one "group".
    n_seg = 1 if n_rows else 0
    seg = (torch.zeros(n_seg, dtype=torch.int64, device=device),
           torch.zeros(n_rows, dtype=torch.int64, device=device),
           torch.full((n_seg,), n_rows, dtype=torch.int64, device=device))
    return rewards, seg, valid



def _normalize_core(rewards, seg, stat_valid, *, usable, truncated, mean_level, std_level, eps, unbiased,
                    leave_one_out, min_valid, process_group, expected_group_size=None, need_kept_row=True):
    """Statistics over every rank, then this rank's advantages. Returns ``(adv, kept_row, stats)``.

    Ids that ascend along the global row order (the trainer's prompt indices; any single-process batch
    of ascending ids) take :func:`_boundary_exchange`: one fixed-size all-gather, O(ranks) bytes. Other
    orders gather every bucket (:func:`_full_gather`, O(groups) bytes), which also reports ids whose
    groups are not contiguous. ``usable``/``truncated`` (``[B]`` bool or None) only feed the step
    statistics; None counts ``stat_valid`` rows as usable and no row as truncated. ``kept_row`` is None
    when ``need_kept_row`` is False.
    """
    seg_ids, seg_inv, lengths = seg
    r = rewards.detach().to(torch.float64)
    # A reward on a valid row that is non-finite or above MAX_ABS_REWARD in magnitude is an error (the
    # centered squares of the std overflow float64 near 1e154, which would turn every advantage of the
    # group into 0 without an error). One reduction detects it (NaN <= x is False); only then are the
    # rows located, and the statistics computed without them, so that every rank still enters the same
    # collectives.
    bad_row = None
    if not bool((torch.where(stat_valid, r.abs(), 0.0) <= MAX_ABS_REWARD).all()):
        bad_row = stat_valid & ~(r.abs() <= MAX_ABS_REWARD)
    moments = _segment_moments(r, stat_valid if bad_row is None else stat_valid & ~bad_row, seg_inv, lengths)
    ok = stat_valid if bad_row is None else stat_valid & ~bad_row

    def seg_count(mask):
        if mask is None:
            return torch.zeros(seg_ids.numel(), dtype=torch.int64, device=r.device)
        return torch.zeros(seg_ids.numel(), dtype=torch.int64, device=r.device).index_add_(
            0, seg_inv, mask.long())

    local = dict(ids=seg_ids, rows=lengths, usable=moments[0] if usable is None else seg_count(usable),
                 truncated=seg_count(truncated), bad_row=bad_row, moments=moments)
    kw = dict(mean_level=mean_level, std_level=std_level, eps=eps, unbiased=unbiased,
              leave_one_out=leave_one_out, min_valid=min_valid, process_group=process_group,
              expected_group_size=expected_group_size)
    out = _boundary_exchange(r, ok, seg_inv, local, need_kept_row=need_kept_row, **kw)
    if out is None:
        out = _full_gather(r, ok, seg_inv, local, **kw)
    adv, kept_row, stats = out
    return adv.to(rewards.dtype), kept_row, stats



def _full_gather(r, ok, seg_inv, local, *, mean_level, std_level, eps, unbiased, leave_one_out, min_valid,
                 process_group, expected_group_size):
    """Every rank's every bucket to every rank (two collectives, O(groups) bytes), then everything
    replicated; also the check that each group's rows are contiguous."""
    device = r.device
    seg_ids = local["ids"]
    n_seg = seg_ids.numel()
    my_rank = dist.rank(process_group)
    n_stat, ref, delta, m2, _ = local["moments"]
    bad_row = local["bad_row"]
    zeros = torch.zeros(n_seg, dtype=torch.int64, device=device)
    table = torch.stack([
        torch.full((n_seg,), my_rank, dtype=torch.int64, device=device),
        seg_ids, local["rows"], n_stat, local["usable"], local["truncated"],
        zeros if bad_row is None else zeros.index_add(0, seg_inv, bad_row.long()),
        _as_bits(ref), _as_bits(delta), _as_bits(m2),
    ], dim=1)
    table = dist.all_gather_varlen(table, process_group)  # [sum_r S_r, 10], rank order

    # ---- checks that need every rank's data: the same outcome on every rank ----------------------
    _raise_non_finite(table[table[:, _NBAD] > 0, _RANK].unique().tolist(), bad_row, my_rank)
    gid = table[:, _ID]
    n_buckets = gid.numel()
    starts = torch.ones(n_buckets, dtype=torch.bool, device=device)
    starts[1:] = gid[1:] != gid[:-1]
    g_idx = torch.cumsum(starts.long(), 0) - 1  # bucket -> global group, groups in order of appearance
    first_ids = gid[starts]
    n_groups = first_ids.numel()
    uniq, counts = torch.unique(first_ids, return_counts=True)
    if uniq.numel() != n_groups:
        dup = uniq[counts > 1]
        ranks = sorted(set(table[torch.isin(gid, dup), _RANK].tolist()))
        raise ValueError(
            "group_ids must be contiguous: each group's rows must be adjacent within a rank, and a group may "
            "only continue from the end of one rank's rows to the start of the next rank's. Group id(s) "
            f"{dup[:10].tolist()} occur in separated runs (on rank(s) {ranks}).")

    # ---- statistics over all ranks: per group, then over the kept groups (batch level) ------------
    n_g, ref_g, delta_g, m2_g = _merge_moments(table[:, _NSTAT], _from_bits(table[:, _REF]),
                                               _from_bits(table[:, _DELTA]), _from_bits(table[:, _M2]),
                                               g_idx, n_groups)
    kept_g = n_g >= min_valid
    n_kept = torch.where(kept_g, n_g, 0)
    batch = _merge_moments(n_kept, ref_g, delta_g, torch.where(kept_g, m2_g, 0.0),
                           torch.zeros(n_groups, dtype=torch.int64, device=device), 1)
    center_ref, center_delta, mult = _group_coefficients(
        (n_g, ref_g, delta_g, m2_g), kept_g, batch, mean_level=mean_level, std_level=std_level, eps=eps,
        unbiased=unbiased, leave_one_out=leave_one_out)

    # ---- this rank's rows: A = ((r - ref) - delta) * mult, per-group coefficients ----------------
    offset = int((table[:, _RANK] < my_rank).sum())
    seg_g = g_idx[offset:offset + n_seg]  # this rank's buckets are contiguous in the gathered table
    row_mult = mult.index_select(0, seg_g).index_select(0, seg_inv)
    if mean_level == "none":
        adv = r * row_mult
    else:
        if mean_level == "group":
            center_ref = center_ref.index_select(0, seg_g).index_select(0, seg_inv)
            center_delta = center_delta.index_select(0, seg_g).index_select(0, seg_inv)
        adv = (r - center_ref).sub_(center_delta).mul_(row_mult)  # offset cancelled before the small delta
    adv = adv.masked_fill_(~ok, 0.0)  # invalid rows: 0, whatever they hold (NaN * 0 would be NaN)
    kept_row = kept_g.index_select(0, seg_g).index_select(0, seg_inv)

    usable_g = torch.zeros(n_groups, dtype=torch.int64, device=device).index_add_(0, g_idx, table[:, _USABLE])
    if expected_group_size is not None:
        reference = expected_group_size
    else:
        reference = int(usable_g.max()) if n_groups else 0
    stats = {
        "num_groups": n_groups,
        "num_partial_groups": int((usable_g < reference).sum()),
        "num_dropped_groups": int((~kept_g).sum()),
        "num_truncated": int(table[:, _TRUNC].sum()),
        "num_rows": int(table[:, _ROWS].sum()),
        "num_stat_rows": int(n_kept.sum()),
    }
    return adv, kept_row, stats



def _boundary_exchange(r, ok, seg_inv, local, *, mean_level, std_level, eps, unbiased, leave_one_out,
                       min_valid, process_group, expected_group_size, need_kept_row):
    """The group statistics over ``W`` ranks from ONE fixed-size all-gather (O(W) bytes, not O(groups)).

    Groups are contiguous, so when the group ids ascend along the global row order only a rank's first
    and last bucket (segments 0 and ``S - 1``) can belong to a group that continues on another rank;
    every other bucket (*interior*) is a whole group. Each rank sends one record: its first and last
    bucket, ``(rows, truncated)`` totals, its interior groups' dropped count, kept stat rows and partial
    count (or, without ``expected_group_size``, their largest usable count and how many reach it) and,
    at a ``batch`` level, the Chan moments of its interior kept groups. Every rank then merges the
    boundary buckets of all ranks in rank order (so a group spanning three or more ranks, through ranks
    holding only part of it, and ranks with no rows are handled), and all the decisions below are taken
    from the same gathered records on every rank. With one process the record is its own result.

    Rows: ``A = c * mult`` with the centered rows ``c`` of :func:`_segment_moments` for a group that is
    one bucket; the rows of a first / last bucket whose group continues elsewhere are recomputed from
    the merged statistics, ``A = ((r - ref) - delta) * mult``.

    Returns ``(adv float64 [B], kept_row [B] or None, stats)``, or None (identically on every rank)
    when the ids do not ascend over the ranks.
    """
    device = r.device
    seg_ids = local["ids"]
    n_seg = seg_ids.numel()
    my_rank = dist.rank(process_group)
    batch_level = "batch" in (mean_level, std_level)
    bad_row = local["bad_row"]
    g_n, g_ref, g_delta, g_m2, centered = local["moments"]     # this rank's buckets = its groups (so far)
    g_usable = local["usable"]
    ascending = bool((seg_ids[1:] > seg_ids[:-1]).all())

    own = torch.arange(n_seg, device=device)
    interior = (own > 0) & (own < n_seg - 1)
    kept_int = interior & (g_n >= min_valid)
    ends = own[[0, -1]] if n_seg else own.new_zeros(2)            # first and last bucket (equal if S = 1)

    def buckets():
        if n_seg == 0:
            return torch.zeros(12, dtype=torch.int64, device=device)
        return torch.stack([seg_ids[ends], g_n[ends], g_usable[ends], _as_bits(g_ref[ends]),
                            _as_bits(g_delta[ends]), _as_bits(g_m2[ends])], dim=1).reshape(-1)

    if expected_group_size is not None:
        partial = [(interior & (g_usable < expected_group_size)).sum()]
    else:
        top = torch.where(interior, g_usable, -1).max() if n_seg else torch.tensor(-1, device=device)
        partial = [top, (interior & (g_usable == top)).sum()]
    flags = n_seg * 4 + ascending * 2 + (bad_row is not None)
    fields = [torch.tensor([flags, int(local["rows"].sum()), int(local["truncated"].sum())],
                           dtype=torch.int64, device=device),
              torch.stack([(interior & ~kept_int).sum(), torch.where(kept_int, g_n, 0).sum()]),
              buckets(), torch.stack(partial).to(torch.int64)]
    if batch_level:
        b_n, b_ref, b_delta, b_m2 = _merge_moments(torch.where(kept_int, g_n, 0), g_ref, g_delta,
                                                   torch.where(kept_int, g_m2, 0.0),
                                                   torch.zeros(n_seg, dtype=torch.int64, device=device), 1)
        fields.append(torch.cat([b_n, _as_bits(b_ref), _as_bits(b_delta), _as_bits(b_m2)]))
    rec = dist.all_gather_fixed(torch.cat(fields).unsqueeze(0), process_group)   # [W, width]

    # ---- identical on every rank from here ------------------------------------------------------
    flags = rec[:, _X_FLAGS]
    nseg_r = flags // 4
    present = torch.stack([nseg_r >= 1, nseg_r >= 2], dim=1).reshape(-1)   # first, last bucket per rank
    bk = rec[:, _X_FIRST:_X_PARTIAL].reshape(-1, 6)                       # [2 W, 6]: first, last, ...
    bk = bk[present]
    ids = bk[:, _B_ID]
    if not (bool((((flags // 2) % 2 == 1) | (nseg_r == 0)).all()) and bool((ids[1:] >= ids[:-1]).all())):
        return None
    _raise_non_finite(torch.nonzero(flags % 2).flatten().tolist(), bad_row, my_rank)
    world = rec.shape[0]
    starts = torch.ones(ids.numel(), dtype=torch.bool, device=device)
    starts[1:] = ids[1:] != ids[:-1]
    b_idx = torch.cumsum(starts.long(), 0) - 1                              # boundary bucket -> group
    n_b = int(starts.sum())
    m_n, m_ref, m_delta, m_m2 = _merge_moments(bk[:, _B_N], _from_bits(bk[:, _B_REF]),
                                               _from_bits(bk[:, _B_DELTA]), _from_bits(bk[:, _B_M2]), b_idx,
                                               n_b)
    per_group = torch.zeros(n_b, dtype=torch.int64, device=device)
    m_usable = per_group.index_add(0, b_idx, bk[:, _B_USABLE])
    m_buckets = per_group.index_add(0, b_idx, torch.ones_like(b_idx))         # buckets per boundary group
    m_kept = m_n >= min_valid

    # this rank's first / last bucket take the merged statistics of their groups when those continue
    # on another rank (one-bucket groups keep their own, so a single process uses c throughout)
    merged_ends = []
    if n_seg:
        first = int(present[:2 * my_rank].sum())             # position of this rank's first bucket
        for k, g in zip(ends[:min(n_seg, 2)].tolist(), b_idx[first:first + min(n_seg, 2)].tolist()):
            if int(m_buckets[g]) > 1:
                merged_ends.append(k)
                g_n, g_ref, g_delta, g_m2 = (t.index_put((torch.tensor([k], device=device),), v[g].reshape(1))
                                             for t, v in ((g_n, m_n), (g_ref, m_ref), (g_delta, m_delta),
                                                          (g_m2, m_m2)))
    kept_g = g_n >= min_valid

    if batch_level:
        col = _X_PARTIAL + (1 if expected_group_size is not None else 2)
        parts = rec[:, col:col + 4]
        batch = _merge_moments(torch.cat([parts[:, 0], torch.where(m_kept, m_n, 0)]),
                               torch.cat([_from_bits(parts[:, 1]), m_ref]),
                               torch.cat([_from_bits(parts[:, 2]), m_delta]),
                               torch.cat([_from_bits(parts[:, 3]), torch.where(m_kept, m_m2, 0.0)]),
                               torch.zeros(world + n_b, dtype=torch.int64, device=device), 1)
    else:  # unused by _group_coefficients
        zero = torch.zeros(1, dtype=torch.float64, device=device)
        batch = (torch.zeros(1, dtype=torch.int64, device=device), zero, zero, zero)
    center_ref, center_delta, mult = _group_coefficients(
        (g_n, g_ref, g_delta, g_m2), kept_g, batch, mean_level=mean_level, std_level=std_level, eps=eps,
        unbiased=unbiased, leave_one_out=leave_one_out)

    row_mult = mult.index_select(0, seg_inv)
    if mean_level == "group":
        adv = centered.mul_(row_mult)        # c is 0 on invalid rows; the moments' buffer is not reused
        if merged_ends:
            bounds = torch.cumsum(local["rows"], 0)
            for k in merged_ends:
                sl = slice(int(bounds[k]) - int(local["rows"][k]), int(bounds[k]))
                adv[sl] = torch.where(ok[sl], ((r[sl] - center_ref[k]) - center_delta[k]) * mult[k], 0.0)
    else:
        adv = r * row_mult if mean_level == "none" else (r - center_ref).sub_(center_delta).mul_(row_mult)
        adv = adv.masked_fill_(~ok, 0.0)  # invalid rows: 0, whatever they hold (NaN * 0 would be NaN)
    kept_row = kept_g.index_select(0, seg_inv) if need_kept_row else None

    n_groups = int((nseg_r - 2).clamp(min=0).sum()) + n_b
    if expected_group_size is not None:
        partial = int(rec[:, _X_PARTIAL].sum()) + int((m_usable < expected_group_size).sum())
    else:
        tops = rec[:, _X_PARTIAL]
        reference = max(int(tops.max()), int(m_usable.max()) if n_b else -1, 0)
        at_top = int(rec[tops == reference, _X_PARTIAL + 1].sum()) + int((m_usable == reference).sum())
        partial = n_groups - at_top if n_groups else 0
    stats = {
        "num_groups": n_groups,
        "num_partial_groups": partial,
        "num_dropped_groups": int(rec[:, _X_DROPPED].sum()) + int((~m_kept).sum()),
        "num_truncated": int(rec[:, _X_TRUNC].sum()),
        "num_rows": int(rec[:, _X_ROWS].sum()),
        "num_stat_rows": int(rec[:, _X_STATROWS].sum()) + int(torch.where(m_kept, m_n, 0).sum()),
    }
    return adv, kept_row, stats
