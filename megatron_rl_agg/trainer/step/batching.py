"""Rows of one mini-batch as tensors, their split over data-parallel ranks, and masked padding rows.

Layout of one row of ``S = --seq-length`` positions (next-token prediction, so the model sees the row
shifted by one)::

    full   = prompt + response                         len(full) <= S + 1
    tokens = full[:-1]  padded with 0 to S             model input
    labels = full[1:]   padded with 0 to S             token predicted at each position
    loss_mask[t] = 1  for  len(prompt) - 1 <= t < len(full) - 1      (the response tokens)

A padding row has ``loss_mask == 0`` everywhere, reward and advantage 0 and a reserved negative group id,
so it adds nothing to any count, weight, loss or gradient: a step padded so that every DP rank runs the
same number of whole micro-batches computes exactly what the unpadded rows compute.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch

from megatron_rl_agg.core.rows import pad_rows_to
from megatron_rl_agg.mcore.routing_replay import padding_routes
from megatron_rl_agg.trainer.rollout.rollouts import Sample

__all__ = ["RowBatch", "build_rows", "pad_group_id", "pad_rows"]


@dataclass(frozen=True)
class RowBatch:
    """``R`` rows of one mini-batch (global, or one rank's share)."""

    tokens: torch.Tensor
    """``[R, S]`` int64 model input."""
    labels: torch.Tensor
    """``[R, S]`` int64 next tokens."""
    loss_mask: torch.Tensor
    """``[R, S]`` float32 0/1, 1 on response tokens."""
    group_ids: torch.Tensor
    """``[R]`` int64 prompt-group ids, global within the mini-batch (rows of a group contiguous)."""
    rewards: torch.Tensor
    """``[R]`` float64 scalar rewards."""
    truncated: torch.Tensor
    """``[R]`` bool, True when generation hit the length limit (finish_reason ``"length"``)."""
    old_logprobs: Optional[torch.Tensor] = None
    """``[R, S]`` float32 behaviour log-probs aligned with ``labels`` (0 off the mask), or None."""
    valid: Optional[torch.Tensor] = None
    """``[R]`` bool, False on rows without a reward (``Sample.reward_error``); None = all valid."""
    versions: Optional[torch.Tensor] = None
    """``[R, S]`` int64 policy version of each response token aligned with ``labels`` (0 off the mask), or
    None (the rows carry no versions)."""
    routes: Optional[torch.Tensor] = None
    """``[R, S, L, k]`` int64 MoE routes of the model inputs (``Sample.routes`` without the last token;
    positions past the row and padding rows: ``padding_routes``), or None."""
    token_mask: Optional[torch.Tensor] = None
    """``[R, S]`` float32: 1 on the model inputs of a row (prompt and response tokens but the last), 0 past
    the row and on padding rows; an MoE model leaves the zeros out of its aux-loss statistics."""

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def rows(self, start: int, end: int) -> "RowBatch":
        """Rows ``start:end`` (views)."""
        return replace(self, **{f.name: _slice(getattr(self, f.name), start, end) for f in fields(self)})

    def to(self, device) -> "RowBatch":
        """Every tensor on ``device`` (the model's; collectives with NCCL need CUDA tensors)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = None if value is None else value.to(device)
        return replace(self, **moved)


def _slice(t: Optional[torch.Tensor], start: int, end: int) -> Optional[torch.Tensor]:
    return None if t is None else t[start:end]


def build_rows(samples: Sequence[Sample], seq_length: int, group_ids: Sequence[int]) -> RowBatch:
    """Pack ``samples`` into a :class:`RowBatch` (layout in the module docstring).

    ``old_logprobs`` is filled only when every sample carries log-probs; a mini-batch that mixes rows
    with and without them is rejected (the two halves would use different old policies). ``versions``
    likewise (every sample's ``versions`` or none).

    Raises:
        ValueError: a row longer than ``seq_length + 1`` tokens, or mixed log-prob / version presence.
    """
    num = len(samples)
    with_lp = [s.logprobs is not None for s in samples]
    if any(with_lp) and not all(with_lp):
        first = samples[with_lp.index(False)]
        raise ValueError(f"{first.source}: row without 'logprobs' in a mini-batch whose other rows have "
                         "them; give log-probs for every row of a file or for none")
    tokens = torch.zeros(num, seq_length, dtype=torch.int64)
    labels = torch.zeros(num, seq_length, dtype=torch.int64)
    mask = torch.zeros(num, seq_length, dtype=torch.float32)
    token_mask = torch.zeros(num, seq_length, dtype=torch.float32)
    old_lp = torch.zeros(num, seq_length, dtype=torch.float32) if all(with_lp) and num else None
    with_versions = [s.versions is not None for s in samples]
    if any(with_versions) and not all(with_versions):
        first = samples[with_versions.index(False)]
        raise ValueError(f"{first.source}: row without 'versions' in a mini-batch whose other rows have them")
    versions = torch.zeros(num, seq_length, dtype=torch.int64) if all(with_versions) and num else None
    with_routes = num > 0 and all(s.routes is not None for s in samples)
    routes = None
    if with_routes:
        layers, topk = len(samples[0].routes[0]), len(samples[0].routes[0][0])
        routes = padding_routes((num, seq_length, layers), topk)
    for i, s in enumerate(samples):
        full = list(s.prompt) + list(s.response)
        if len(full) > seq_length + 1:
            raise ValueError(f"{s.source or 'row ' + str(i)}: prompt + response = {len(full)} tokens exceed "
                             f"--seq-length {seq_length} + 1; raise --seq-length")
        tokens[i, : len(full) - 1] = torch.tensor(full[:-1], dtype=torch.int64)
        labels[i, : len(full) - 1] = torch.tensor(full[1:], dtype=torch.int64)
        token_mask[i, : len(full) - 1] = 1.0
        lo, hi = len(s.prompt) - 1, len(full) - 1
        mask[i, lo:hi] = 1.0
        if old_lp is not None:
            old_lp[i, lo:hi] = torch.tensor(s.logprobs, dtype=torch.float32)
        if versions is not None:
            versions[i, lo:hi] = torch.tensor(s.versions, dtype=torch.int64)
        if routes is not None:       # the route of each model input (the last token is never one)
            routes[i, : len(full) - 1] = torch.tensor(s.routes[:-1], dtype=torch.int64)
    return RowBatch(
        tokens=tokens, labels=labels, loss_mask=mask,
        group_ids=torch.as_tensor(list(group_ids), dtype=torch.int64).reshape(num),
        rewards=torch.tensor([s.reward for s in samples], dtype=torch.float64).reshape(num),
        truncated=torch.tensor([s.truncated for s in samples], dtype=torch.bool).reshape(num),
        old_logprobs=old_lp, versions=versions, routes=routes, token_mask=token_mask,
        valid=torch.tensor([s.reward_error is None for s in samples], dtype=torch.bool).reshape(num))


def pad_group_id(dp_rank: int) -> int:
    """Group id of the padding rows of ``dp_rank``: negative ids are reserved for padding, so they never
    collide with a real group, and each rank's own id keeps every group contiguous."""
    return -1 - dp_rank


def pad_rows(batch: RowBatch, advantages: torch.Tensor, total: int, dp_rank: int
             ) -> tuple[RowBatch, torch.Tensor]:
    """``batch`` (this rank's rows) padded with fully masked rows to ``total`` rows.

    Padding rows have ``loss_mask = 0``, reward and advantage 0 and group id :func:`pad_group_id`, so
    they enter no count, weight, loss or gradient.
    """
    if total < batch.num_rows:
        raise ValueError(f"cannot pad {batch.num_rows} rows down to {total}")
    padded = RowBatch(
        tokens=pad_rows_to(batch.tokens, total, 0), labels=pad_rows_to(batch.labels, total, 0),
        loss_mask=pad_rows_to(batch.loss_mask, total, 0.0),
        group_ids=pad_rows_to(batch.group_ids, total, pad_group_id(dp_rank)),
        rewards=pad_rows_to(batch.rewards, total, 0.0), truncated=pad_rows_to(batch.truncated, total, False),
        old_logprobs=pad_rows_to(batch.old_logprobs, total, 0.0),
        valid=pad_rows_to(batch.valid, total, False), versions=pad_rows_to(batch.versions, total, 0),
        token_mask=pad_rows_to(batch.token_mask, total, 0.0),
        routes=None if batch.routes is None else torch.cat(
            [batch.routes, padding_routes((total - batch.num_rows,) + tuple(batch.routes.shape[1:3]),
                                          batch.routes.shape[3])]))
    return padded, pad_rows_to(advantages, total, 0.0)
