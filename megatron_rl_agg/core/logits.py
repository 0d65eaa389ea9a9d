"""Full-vocabulary log-probs and entropy of ``[B, T, V]`` logits on one device (pure math).

The single-device references: the Megatron path (:mod:`megatron_rl_agg.mcore.loss`) computes the same
quantities on vocab-split logits without gathering them, and the tests compare the two.
"""

from __future__ import annotations

import torch

__all__ = ["logprobs_from_logits", "entropy_from_logits"]


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[label]``: ``logits [B, T, V]``, ``labels [B, T]`` -> ``[B, T]`` (float32+)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``H = -sum_v p_v log p_v`` of ``softmax(logits)``: ``[B, T, V]`` -> ``[B, T]`` (float32+)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)
