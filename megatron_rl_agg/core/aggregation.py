"""Loss-aggregation modes as exact, global per-token weights (pure math, no Megatron).

Notation (one optimizer mini-batch = all micro-batches on all data-parallel ranks):

* ``l[i, t]``  per-token loss of row ``i``, position ``t``; ``m[i, t]`` the 0/1 loss mask.
* ``|o_i| = sum_t m[i, t]``  loss tokens of row ``i``; row ``i`` is *live* when ``|o_i| > 0``.
* ``N_tok = sum_{i,t} m``, ``N_live = #live rows``, ``L = max_response_length``.
* groups ``g`` are prompt groups (rows sampled from one prompt); ``|g| = sum_{i in g} |o_i|`` and a group
  is live when ``|g| > 0``; ``N_grp = #live groups``.

Every mode but the legacy one is a fixed per-token weight ``w[i, t]`` such that the mini-batch objective
is ``sum_{i,t} w[i, t] * l[i, t]`` (see ``docs/aggregation.md``):

==========================  ======================================  ==========================
mode                        w[i, t] / m[i, t]                       origin
==========================  ======================================  ==========================
token_mean                  1 / N_tok                               DAPO; AReaL/verl default
token_sum                   1                                       Tinker-style
seq_mean_token_mean         1 / (N_live * |o_i|)                    GRPO
seq_mean_token_sum          1 / N_live                              verl
seq_mean_token_sum_norm     1 / (N_live * L)                        Dr. GRPO
prompt_mean                 1 / (N_grp * |g(i)|)                    MiniMax-M1
token_mean_legacy           1 / (M * tokens of i's micro-batch)     old Megatron/SkyRL
==========================  ======================================  ==========================

(``M`` = number of micro-batches over all DP ranks.) Each weight depends only on counts, never on the
loss, so it can be computed once per mini-batch, before any forward pass; the counts are the only global
quantities, which is what makes the result independent of micro-batch size and parallel layout. All
counts are clamped to >= 1 instead of branched on, so an all-masked batch aggregates to exactly 0.

This module never calls ``torch.distributed``: the counts that span ranks are reduced through the named
collectives of :mod:`megatron_rl_agg.parallel.dist`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_rl_agg.parallel import dist
from megatron_rl_agg.core.validate import positive_int

__all__ = [
    "AggregationMode",
    "LOSS_AGGREGATIONS",
    "aggregation_names",
    "get_aggregation",
    "resolve_aggregation",
    "aggregate",
    "token_weights",
    "microbatch_mean_weights",
    "group_ids_from_sizes",
]


@dataclass(frozen=True)
class AggregationMode:
    """One entry of the aggregation registry."""

    name: str
    """Canonical name (the value ``--loss-aggregation`` stores)."""
    aliases: tuple[str, ...]
    """Other accepted spellings (verl's dashed names, SkyRL's names, short forms)."""
    unit: str
    """The unit every instance of which gets equal total weight: token, sequence or prompt group."""
    origin: str
    """Paper or framework the mode comes from."""
    needs_groups: bool = False
    """Needs prompt groups (``group_sizes`` or ``group_ids``)."""
    needs_max_response_length: bool = False
    """Needs the constant horizon ``L``."""
    exact_global: bool = True
    """False only for the legacy per-micro-batch mean, which has no global weights."""


_REGISTRY: dict[str, AggregationMode] = {}
_LOOKUP: dict[str, str] = {}


def _register(mode: AggregationMode) -> None:
    for spelling in (mode.name,) + mode.aliases:
        if spelling in _LOOKUP:
            raise ValueError(f"aggregation name {spelling!r} registered twice")
        _LOOKUP[spelling] = mode.name
    _REGISTRY[mode.name] = mode


_register(AggregationMode("token_mean", ("token-mean",), "token", "DAPO; AReaL/verl default"))
_register(AggregationMode("token_sum", ("token-sum",), "token (unnormalized)", "Tinker-style"))
_register(AggregationMode(
    "seq_mean_token_mean", ("seq-mean-token-mean", "seq_mean", "sequence_mean", "seq-mean"),
    "sequence", "GRPO"))
_register(AggregationMode("seq_mean_token_sum", ("seq-mean-token-sum",), "sequence (length-weighted)",
                          "verl"))
_register(AggregationMode(
    "seq_mean_token_sum_norm", ("seq-mean-token-sum-norm", "dr_grpo", "dr-grpo"),
    "constant horizon", "Dr. GRPO", needs_max_response_length=True))
_register(AggregationMode("prompt_mean", ("prompt-mean", "group_mean", "group-mean"), "prompt group",
                          "MiniMax-M1", needs_groups=True))
_register(AggregationMode("token_mean_legacy", ("token-mean-legacy",), "micro-batch",
                          "old Megatron/SkyRL per-micro-batch mean", exact_global=False))

LOSS_AGGREGATIONS: tuple[str, ...] = tuple(_REGISTRY)
"""The seven canonical mode names, in registry order."""


def aggregation_names() -> tuple[str, ...]:
    """Every accepted spelling: canonical names first, then aliases."""
    return LOSS_AGGREGATIONS + tuple(k for k in _LOOKUP if k not in _REGISTRY)


def resolve_aggregation(name: str) -> str:
    """Canonical name for ``name`` (a canonical name or an alias, case-insensitive).

    Raises:
        ValueError: naming ``name`` and listing every canonical name and every alias.
    """
    if not isinstance(name, str):
        raise TypeError(f"a loss aggregation mode is a str, got {name!r} ({type(name).__name__}); valid "
                        f"names: {', '.join(LOSS_AGGREGATIONS)}")
    key = name.strip().lower()
    if key not in _LOOKUP:
        aliases = ", ".join(f"{a} -> {c}" for a, c in _LOOKUP.items() if a != c)
        raise ValueError(
            f"unknown loss aggregation {name!r}; valid names: {', '.join(LOSS_AGGREGATIONS)} "
            f"(aliases: {aliases})")
    return _LOOKUP[key]


def get_aggregation(name: str) -> AggregationMode:
    """Registry entry for a canonical name or alias."""
    return _REGISTRY[resolve_aggregation(name)]


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------

def _as_mask(loss_mask: torch.Tensor, check_values: bool = True) -> torch.Tensor:
    """The mask as bool after checking it is a ``[B, T]`` tensor of 0/1 (or bool).

    A mask of other values (0.5, 2, -1, NaN) has no meaning as a set of loss tokens: converting it to
    bool would silently count every non-zero entry as a full token. One reduction and one host read per
    call (once per mini-batch: these functions are not called per micro-batch).
    """
    if not isinstance(loss_mask, torch.Tensor):
        raise TypeError(f"loss_mask must be a torch.Tensor [B, T] of 0/1 or bool, got "
                        f"{type(loss_mask).__name__}")
    if loss_mask.dim() != 2:
        raise ValueError(f"loss_mask must be [B, T], got shape {tuple(loss_mask.shape)}")
    if loss_mask.dtype != torch.bool and check_values:
        if loss_mask.is_complex():
            raise TypeError(f"loss_mask must be 0/1 or bool, got dtype {loss_mask.dtype}")
        bad = (loss_mask != 0) & (loss_mask != 1)
        if bool(bad.any()):
            value = loss_mask[bad][0].item()
            raise ValueError(f"loss_mask must hold only 0 and 1 (or be bool); found {value!r} "
                             f"({int(bad.sum())} such entries); pass (mask > 0) for a soft mask")
    return loss_mask.to(torch.bool)


def check_loss_mask(loss_mask: torch.Tensor) -> None:
    """Raise unless ``loss_mask`` is a ``[B, T]`` tensor of 0/1 or bool (one host read)."""
    _as_mask(loss_mask)


def group_ids_from_sizes(group_sizes: Sequence[int], num_rows: int,
                         device: Optional[torch.device] = None) -> torch.Tensor:
    """``[B]`` int64 group ids 0, 0, .., 1, .. for contiguous groups of the given sizes.

    Raises:
        ValueError: a size that is not a positive int, or sizes that do not sum to ``num_rows``.
    """
    sizes = list(group_sizes)
    bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s <= 0]
    if bad:
        raise ValueError(f"group_sizes must be positive ints, got {bad[:5]} in {sizes[:20]}")
    if sum(sizes) != num_rows:
        raise ValueError(f"group_sizes sum to {sum(sizes)} but the batch has {num_rows} rows")
    counts = torch.tensor(sizes, dtype=torch.int64, device=device)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)


def _check_group_ids(group_ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"group_ids must be a torch.Tensor [B] of dtype int64 or int32, got "
                        f"{type(group_ids).__name__}; use torch.as_tensor(ids, dtype=torch.int64)")
    if group_ids.dim() != 1 or group_ids.shape[0] != num_rows:
        raise ValueError(f"group_ids must be [B]=[{num_rows}], got shape {tuple(group_ids.shape)}")
    if group_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"group_ids dtype {group_ids.dtype} is not supported; accepted: torch.int64, "
                        "torch.int32")
    group_ids = group_ids.to(torch.int64)
    n_runs = torch.unique_consecutive(group_ids).numel()
    n_unique = torch.unique(group_ids).numel()
    if n_runs != n_unique:
        raise ValueError(
            "group_ids must keep each group's rows contiguous within a rank; got "
            f"{n_unique} distinct ids in {n_runs} runs: {group_ids.tolist()[:32]}")
    return group_ids


def _resolve_groups(mode: AggregationMode, num_rows: int, device, group_sizes, group_ids,
                    process_group) -> Optional[torch.Tensor]:
    if not mode.needs_groups:
        return None
    if group_sizes is not None and group_ids is not None:
        raise ValueError("give either group_sizes or group_ids, not both")
    if group_ids is not None:
        return _check_group_ids(group_ids, num_rows).to(device)
    if group_sizes is None:
        raise ValueError(
            f"loss aggregation {mode.name!r} needs prompt groups: pass group_sizes (single process) "
            "or group_ids ([B] int64, global ids)")
    if dist.world_size(process_group) > 1:
        raise ValueError(
            "group_sizes describe this rank's rows only and cannot match groups across ranks; with a "
            "process_group of size > 1 pass group_ids (the same id on every rank for one prompt group)")
    return group_ids_from_sizes(group_sizes, num_rows, device)


def _check_horizon(mode: AggregationMode, max_response_length) -> Optional[int]:
    if not mode.needs_max_response_length:
        return None
    if max_response_length is None:
        raise ValueError(
            f"loss aggregation {mode.name!r} divides by the constant horizon L: pass "
            "max_response_length (--max-response-length), a positive int")
    return positive_int(max_response_length, "max_response_length")


# ----------------------------------------------------------------------------------------------
# single-process reference
# ----------------------------------------------------------------------------------------------

def aggregate(values: torch.Tensor, loss_mask: torch.Tensor, mode: str, *,
              group_sizes: Optional[Sequence[int]] = None,
              max_response_length: Optional[int] = None,
              micro_batch_size: Optional[int] = None) -> torch.Tensor:
    """Aggregate per-token ``values`` over one whole mini-batch (single-process reference).

    Written directly from each mode's definition (means of means), independently of
    :func:`token_weights`, so the two can check each other.

    Args:
        values: ``[B, T]`` per-token values (masked positions are ignored, even if NaN).
        loss_mask: ``[B, T]`` 0/1 or bool.
        mode: a name from :data:`LOSS_AGGREGATIONS` or an alias.
        group_sizes: contiguous prompt-group sizes summing to ``B`` (``prompt_mean``).
        max_response_length: ``L`` (``seq_mean_token_sum_norm``).
        micro_batch_size: rows per micro-batch (``token_mean_legacy``; ``None`` = one micro-batch).
            Micro-batches are consecutive rows; a trailing short micro-batch counts as one.

    Returns:
        0-d tensor in ``values.dtype``; 0 for an all-masked batch.
    """
    spec = get_aggregation(mode)
    m = _as_mask(loss_mask)
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError(f"values must be a floating-point torch.Tensor [B, T], got "
                        f"{getattr(values, 'dtype', type(values).__name__)}")
    if values.shape != m.shape:
        raise ValueError(f"values {tuple(values.shape)} and loss_mask {tuple(m.shape)} differ in shape")
    out_dtype = values.dtype
    # Sums and counts in float64: an fp16 / bf16 sum over more than 65504 tokens (or of large values)
    # would overflow or lose the count; the result is cast back to the input dtype.
    values = values.to(torch.float64)
    return _aggregate64(values, m, spec, group_sizes, max_response_length, micro_batch_size).to(out_dtype)


def _aggregate64(values, m, spec, group_sizes, max_response_length, micro_batch_size) -> torch.Tensor:
    v = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))
    row_sum = v.sum(dim=1)                                  # [B]  sum_t l*m
    row_tok = m.sum(dim=1).to(values.dtype)                 # [B]  |o_i|
    live = row_tok > 0
    zero = values.new_zeros(())
    name = spec.name
    if name == "token_mean":
        return v.sum() / row_tok.sum().clamp(min=1)
    if name == "token_sum":
        return v.sum()
    if name == "seq_mean_token_mean":
        return (row_sum[live] / row_tok[live]).mean() if live.any() else zero
    if name == "seq_mean_token_sum":
        return row_sum[live].mean() if live.any() else zero
    if name == "seq_mean_token_sum_norm":
        horizon = _check_horizon(spec, max_response_length)
        return row_sum.sum() / (live.sum().clamp(min=1) * horizon)
    if name == "prompt_mean":
        gid = _resolve_groups(spec, m.shape[0], m.device, group_sizes, None, None)
        n_groups = int(gid.max().item()) + 1 if gid.numel() else 0
        g_sum = values.new_zeros(n_groups).index_add_(0, gid, row_sum)
        g_tok = values.new_zeros(n_groups).index_add_(0, gid, row_tok)
        g_live = g_tok > 0
        return (g_sum[g_live] / g_tok[g_live]).mean() if g_live.any() else zero
    # token_mean_legacy: mean over micro-batches of each micro-batch's own token mean.
    mbs = m.shape[0] if micro_batch_size is None else micro_batch_size
    if isinstance(mbs, bool) or not isinstance(mbs, int) or mbs <= 0:
        raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
    means = [row_sum[s:s + mbs].sum() / row_tok[s:s + mbs].sum().clamp(min=1)
             for s in range(0, m.shape[0], mbs)]
    return torch.stack(means).mean() if means else zero


# ----------------------------------------------------------------------------------------------
# global weights
# ----------------------------------------------------------------------------------------------

def microbatch_mean_weights(loss_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[b, T]`` weights ``m / max(sum m, 1)``: the token mean of ONE micro-batch.

    Used for the legacy mode and for the default KL/entropy terms, whose coefficients keep Megatron's
    per-micro-batch averaging. Called per micro-batch, so it does not read the mask's values back to the
    host: check the whole mini-batch's mask once with :func:`check_loss_mask`.
    """
    m = _as_mask(loss_mask, check_values=False).to(dtype)
    return m / m.sum().clamp(min=1)


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
    gid = _resolve_groups(spec, m.shape[0], m.device, group_sizes, group_ids, process_group)
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
