"""Global per-token aggregation weights of one mini-batch, exact across micro-batches and DP ranks.

:func:`token_weights` realizes each mode of :mod:`megatron_rl_agg.core.aggregation` as a fixed weight
``w[i, t]`` (the table there): the only global quantities are counts (``N_tok``, ``N_live``, the token
count of each prompt group and ``N_grp``), reduced here once per mini-batch through the named collectives of
:mod:`megatron_rl_agg.parallel.dist`, so ``sum over ranks of (w * values).sum() == aggregate(all rows)``
whatever the micro-batch split.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_rl_agg.core.aggregation import (_REGISTRY, LOSS_AGGREGATIONS, _as_mask, _check_horizon,
                                              _resolve_groups, get_aggregation)
from megatron_rl_agg.parallel import dist

__all__ = ["token_weights"]


def _group_token_totals(gid: torch.Tensor, row_tok: torch.Tensor, process_group):
    """Per-row token total of the row's group, summed over every rank, and the global live-group count.

    Each rank summarizes its rows as one ``(id, tokens)`` bucket per local group run. When the ids ascend
    along the global row order (checked from the exchanged records, identically on every rank), only a
    rank's first and last bucket can belong to a group that continues on another rank, so ONE fixed-size
    all-gather of ``[flags, first id, first tokens, last id, last tokens, live interior groups]`` per rank
    (48 bytes, whatever the number of groups) gives every rank the totals of its boundary groups and the
    live-group count: :func:`_boundary_totals`. Otherwise every bucket of every rank is gathered
    (``all_gather_varlen``: two more collectives) and summed by id, so a group whose rows sit on several
    ranks (or in several micro-batches) gets its full size either way.
    """
    local_ids, inverse = torch.unique_consecutive(gid, return_inverse=True)
    local_tok = torch.zeros(local_ids.numel(), dtype=torch.int64, device=gid.device)
    local_tok.index_add_(0, inverse, row_tok)
    if dist.world_size(process_group) > 1:
        fast = _boundary_totals(local_ids, local_tok, process_group)
        if fast is not None:
            seg_total, n_groups = fast
            return seg_total[inverse], n_groups
    buckets = dist.all_gather_varlen(torch.stack([local_ids, local_tok], dim=1), process_group)
    all_ids, bucket_to_group = torch.unique(buckets[:, 0], return_inverse=True)   # sorted ids
    totals = torch.zeros(all_ids.numel(), dtype=torch.int64, device=gid.device)
    totals.index_add_(0, bucket_to_group, buckets[:, 1])
    row_group_total = totals[torch.searchsorted(all_ids, gid)]
    return row_group_total, (totals > 0).sum()


def _boundary_totals(local_ids: torch.Tensor, local_tok: torch.Tensor, process_group):
    """``(tokens of each local run's whole group [S], live groups over all ranks)`` from one all-gather of
    a 6-column int64 record per rank, or None (on every rank) when the ids do not ascend over the ranks.

    A rank's interior runs (all but its first and last) are whole groups; its first / last run takes the
    sum of the boundary buckets of all ranks that carry the same id in a row (a group spanning three or
    more ranks, ranks with no rows or one run included)."""
    dev = local_ids.device
    n_seg = local_ids.numel()
    ascending = bool((local_ids[1:] > local_ids[:-1]).all())
    own = torch.arange(n_seg, device=dev)
    interior = (own > 0) & (own < n_seg - 1)
    ends = torch.tensor([0, n_seg - 1], device=dev)[:min(n_seg, 2)]
    first_last = torch.zeros(2, 2, dtype=torch.int64, device=dev)
    if n_seg:
        first_last[:, 0], first_last[:, 1] = local_ids[ends[[0, -1]]], local_tok[ends[[0, -1]]]
    record = torch.cat([torch.tensor([n_seg * 2 + ascending], dtype=torch.int64, device=dev),
                        first_last.reshape(-1), ((local_tok > 0) & interior).sum().reshape(1)])
    rec = dist.all_gather_fixed(record.unsqueeze(0), process_group)          # [W, 6]
    nseg_r = rec[:, 0] // 2
    present = torch.stack([nseg_r >= 1, nseg_r >= 2], dim=1).reshape(-1)
    bk = rec[:, 1:5].reshape(-1, 2)[present]                               # (id, tokens) in row order
    ids = bk[:, 0]
    if not (bool(((rec[:, 0] % 2 == 1) | (nseg_r == 0)).all()) and bool((ids[1:] >= ids[:-1]).all())):
        return None
    starts = torch.ones(ids.numel(), dtype=torch.bool, device=dev)
    starts[1:] = ids[1:] != ids[:-1]
    b_idx = torch.cumsum(starts.long(), 0) - 1
    totals = torch.zeros(int(starts.sum()), dtype=torch.int64, device=dev).index_add_(0, b_idx, bk[:, 1])
    seg_total = local_tok
    if n_seg:
        first = int(present[:2 * dist.rank(process_group)].sum())
        seg_total = local_tok.index_put((ends,), totals[b_idx[first:first + ends.numel()]])
    return seg_total, rec[:, 5].sum() + (totals > 0).sum()


def token_weights(loss_mask: torch.Tensor, mode: str, *,
                  group_sizes: Optional[Sequence[int]] = None,
                  group_ids: Optional[torch.Tensor] = None,
                  max_response_length: Optional[int] = None,
                  process_group=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Global per-token weights ``w`` for one mini-batch.

    Call once per optimizer mini-batch with this rank's rows (all of its micro-batches), then slice the
    rows into micro-batches. Then ``sum over ranks of (w * values).sum() == aggregate(all rows)``.

    Collectives (over ``process_group``, none when it is None): one all-reduce of ``[N_tok, N_live]``
    for the token/sequence modes, none for ``token_sum``, plus, for ``prompt_mean``, one all-gather of a
    48-byte boundary record per rank (three all-gathers when the group ids do not ascend over the ranks,
    see :func:`_group_token_totals`). None of them depends on the number of micro-batches.

    Args:
        loss_mask: ``[B, T]`` 0/1 or bool, this rank's rows.
        mode: canonical name or alias; ``token_mean_legacy`` has no global weights (use
            :func:`microbatch_mean_weights` per micro-batch).
        group_sizes: contiguous group sizes summing to ``B`` (single process only).
        group_ids: ``[B]`` int64 global group ids; one group's rows contiguous within a rank; a group
            may continue on another rank or in another micro-batch.
        max_response_length: ``L`` for ``seq_mean_token_sum_norm``.
        process_group: the data-parallel group (counts are summed over it).
        dtype: dtype of the returned weights.

    Returns:
        ``[B, T]`` tensor, zero wherever the mask is zero.
    """
    spec = get_aggregation(mode)
    if not spec.exact_global:
        raise ValueError(
            f"{spec.name!r} is a per-micro-batch mean and has no global weights; use "
            "microbatch_mean_weights() per micro-batch, or one of "
            f"{', '.join(n for n in LOSS_AGGREGATIONS if _REGISTRY[n].exact_global)}")
    m = _as_mask(loss_mask)
    horizon = _check_horizon(spec, max_response_length)
    gid = _resolve_groups(spec, m.shape[0], m.device, group_sizes, group_ids, dist.world_size(process_group))
    mf = m.to(dtype)
    if spec.name == "token_sum":
        return mf
    row_tok = m.sum(dim=1)                                             # [B] int64, |o_i|
    counts = torch.stack([row_tok.sum(), (row_tok > 0).sum()]).to(torch.float64)
    n_tok, n_live = dist.all_reduce_sum(counts, process_group).clamp(min=1).unbind()
    if spec.name == "token_mean":
        scale = (1.0 / n_tok).expand(m.shape[0])
    elif spec.name == "seq_mean_token_mean":
        scale = 1.0 / (n_live * row_tok.clamp(min=1).to(torch.float64))
    elif spec.name == "seq_mean_token_sum":
        scale = (1.0 / n_live).expand(m.shape[0])
    elif spec.name == "seq_mean_token_sum_norm":
        scale = (1.0 / (n_live * horizon)).expand(m.shape[0])
    else:  # prompt_mean
        group_tok, n_groups = _group_token_totals(gid, row_tok, process_group)
        scale = 1.0 / (n_groups.clamp(min=1).to(torch.float64) * group_tok.clamp(min=1).to(torch.float64))
    return mf * scale.to(dtype).unsqueeze(1)
