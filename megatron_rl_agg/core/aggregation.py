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

This module is the math of one process: the registry, :func:`aggregate` (the reference value of a whole
mini-batch) and the legacy per-micro-batch weights. The global weights, whose counts span data-parallel
ranks, are :func:`megatron_rl_agg.parallel.weights.token_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_rl_agg.core.validate import positive_int

__all__ = [
    "AggregationMode",
    "LOSS_AGGREGATIONS",
    "aggregation_names",
    "get_aggregation",
    "resolve_aggregation",
    "aggregate",
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
                    world_size: int = 1) -> Optional[torch.Tensor]:
    """``[B]`` int64 group ids of the rows, or None when ``mode`` needs no groups. ``group_sizes`` describe
    one process's rows, so they are refused when the weights span ``world_size > 1`` ranks."""
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
    if world_size > 1:
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
        gid = _resolve_groups(spec, m.shape[0], m.device, group_sizes, None)
        n_groups = int(gid.max().item()) + 1 if gid.numel() else 0
        g_sum = values.new_zeros(n_groups).index_add_(0, gid, row_sum)
        g_tok = values.new_zeros(n_groups).index_add_(0, gid, row_tok)
        g_live = g_tok > 0
        return (g_sum[g_live] / g_tok[g_live]).mean() if g_live.any() else zero
    # token_mean_legacy: mean over micro-batches of each micro-batch's own token mean.
    mbs = positive_int(m.shape[0] if micro_batch_size is None else micro_batch_size, "micro_batch_size")
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
