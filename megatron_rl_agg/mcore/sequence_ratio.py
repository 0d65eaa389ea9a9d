"""Per-sequence log-ratios of the sequence-level policy losses (GSPO, GSPO-token, GMPO), exact wherever a
sequence's tokens live.

A row lives in one micro-batch. Its mean log-ratio ``mean_{t in loss tokens} q_t`` (``q`` the loss's
``seq_token_log_ratio`` of the clamped per-token log-ratio) needs its numerator and its loss-token count:

* padded rows: the numerator is a sum over the row's tokens, ``[b]``; the count is the FULL row's loss
  tokens, counted by :func:`megatron_rl_agg.mcore.batch.prepare_microbatches` before the context-parallel
  split (``row_tokens [b]``);
* context parallelism: each CP rank holds a zigzag shard of every row, so the ``[b]`` numerators are
  summed over the CP group with :func:`megatron_rl_agg.parallel.dist.all_reduce_sum_differentiable` (ONE
  scalar per sequence, ``b * 8`` bytes forward and backward, instead of an all-gather of ``[b, S]``
  log-probs); its backward sums the output gradient over the group, the exact gradient of every shard;
* sequence packing (THD): a micro-batch is one ``[1, T]`` pack whose rows are segments; ``row_id`` and
  ``row_tokens`` were broadcast to every token of their row by the packing, so the numerators are a
  segment sum (``index_add``) and each token reads its own row's mean back.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from megatron_rl_agg.core.policy_losses import PolicyLoss, clamped_log_ratio
from megatron_rl_agg.mcore import compat
from megatron_rl_agg.parallel import dist

__all__ = ["sequence_log_ratio"]


def sequence_log_ratio(loss: PolicyLoss, params: Mapping[str, Any], logp: torch.Tensor, old: torch.Tensor,
                       adv: torch.Tensor, mask: torch.Tensor, micro_batch: Mapping[str, Any]) -> torch.Tensor:
    """The mean over each sequence's loss tokens of ``loss.seq_token_log_ratio``: ``[b]`` for padded rows
    (under CP summed over the CP group), ``[1, T]`` per token for a packed micro-batch.

    Args:
        logp: ``[b, s]`` current log-probs (carry the gradient); ``old`` ``[b, s]`` behaviour log-probs.
        adv: ``[b, s]`` advantages (GMPO's clip side is the sign of the advantage).
        mask: ``[b, s]`` bool loss mask of this shard / pack.
        micro_batch: from ``prepare_microbatches`` for a sequence-level loss (``row_id``, ``row_tokens``,
            ``rows_per_microbatch``), possibly packed.
    """
    if "row_tokens" not in micro_batch:
        raise ValueError(f"policy_loss={loss.name!r} is sequence-level but the micro-batch carries no "
                         "row_tokens: prepare it with prepare_microbatches and this loss config")
    q = loss.seq_token_log_ratio(clamped_log_ratio(logp, old), adv, **params)
    q = torch.where(mask, q, 0.0)
    counts = micro_batch["row_tokens"].to(q.dtype).clamp(min=1)
    row_id = micro_batch["row_id"]
    if row_id.dim() == 1:
        numerator = dist.all_reduce_sum_differentiable(q.sum(-1), compat.parallel_group("cp")[0])
        return numerator / counts
    rows = micro_batch["rows_per_microbatch"]
    numerator = q.new_zeros(rows).index_add(0, row_id.reshape(-1), q.reshape(-1))
    return numerator[row_id] / counts
