"""Context-parallel (CP) sequence sharding: Megatron's zigzag split, as pure index math (no Megatron).

Megatron-Core's context parallelism (``megatron.core.utils.get_batch_on_this_cp_rank``; the rotary
table is sliced the same way in ``rope_utils.get_pos_emb_on_this_cp_rank``) cuts every ``[b, S]`` row
into ``2 C`` equal chunks of ``S / (2 C)`` positions and gives CP rank ``r`` the two chunks ``r`` and
``2 C - 1 - r``, in that order. Under a causal mask the early chunks are cheap and the late ones
expensive, so pairing chunk ``r`` with its mirror balances the attention work across ranks.

Example, ``S = 8``, ``C = 2`` (chunks of 2): rank 0 keeps positions ``[0, 1, 6, 7]``, rank 1 keeps
``[2, 3, 4, 5]``.

Every per-token tensor the loss uses (tokens, labels, loss mask, position ids, advantages, behaviour
and reference log-probs, the global weights) must be split with the same indices, which is what
:func:`split_for_cp_rank` does; :func:`merge_cp_shards` inverts it for a tensor gathered from all ranks.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_rl_agg.core.validate import positive_int

__all__ = ["check_cp_seq_length", "zigzag_indices", "split_for_cp_rank", "merge_cp_shards"]


def check_cp_seq_length(seq_length: int, cp_size: int) -> None:
    """Raise ValueError unless ``seq_length`` splits into ``2 * cp_size`` equal chunks."""
    positive_int(cp_size, "context-parallel size")
    if seq_length % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_length} is not divisible by 2 * context_parallel_size = {2 * cp_size}: "
            f"context parallelism splits every row into 2 * CP equal chunks; pad the rows to a multiple of "
            f"{2 * cp_size} (e.g. --seq-length {-(-seq_length // (2 * cp_size)) * 2 * cp_size}) or use a "
            "smaller context-parallel size")


def zigzag_indices(seq_length: int, cp_size: int, cp_rank: int,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """``[seq_length / cp_size]`` int64 global positions held by CP rank ``cp_rank``.

    ``chunk = seq_length / (2 C)``; the result is ``[r*chunk, (r+1)*chunk) ++ [(2C-1-r)*chunk, (2C-r)*chunk)``.
    """
    check_cp_seq_length(seq_length, cp_size)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside [0, {cp_size})")
    chunk = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    mirror = 2 * cp_size - 1 - cp_rank
    second = torch.arange(mirror * chunk, (mirror + 1) * chunk, device=device)
    return torch.cat([first, second])


def split_for_cp_rank(tensor: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's zigzag shard of ``tensor`` along ``dim`` (size ``S`` -> ``S / cp_size``).

    Identity (the same tensor) at ``cp_size == 1``.
    """
    if cp_size == 1:
        return tensor
    index = zigzag_indices(tensor.shape[dim], cp_size, cp_rank, device=tensor.device)
    return tensor.index_select(dim, index)


def merge_cp_shards(stacked: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Invert :func:`split_for_cp_rank`: ``stacked[r]`` is rank ``r``'s shard (``[C, ..., S / C, ...]``
    with the sequence at ``dim`` of each shard); returns the full tensor, positions in global order."""
    cp_size = stacked.shape[0]
    if cp_size == 1:
        return stacked[0]
    seq = stacked.shape[dim + 1] * cp_size
    positions = torch.cat([zigzag_indices(seq, cp_size, r, device=stacked.device) for r in range(cp_size)])
    flat = torch.cat(list(stacked.unbind(0)), dim=dim)             # shards side by side, rank order
    return flat.index_select(dim, torch.argsort(positions))
