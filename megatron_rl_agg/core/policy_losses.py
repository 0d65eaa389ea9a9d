"""Policy-gradient loss terms per token (pure math: no torch.distributed, no Megatron).

Everything here maps ``[B, T]`` per-token inputs to ``[B, T]`` per-token outputs; aggregation over
tokens, rows, micro-batches and ranks is done elsewhere with the global weights of
:mod:`megatron_rl_agg.parallel.weights` (the math of each mode in :mod:`megatron_rl_agg.core.aggregation`).
This module is the home of the policy losses (today the PPO clipped surrogate); the KL estimators are in
:mod:`megatron_rl_agg.core.kl`, the full-vocabulary log-prob references in :mod:`megatron_rl_agg.core.logits`.

Notation (per token):

* ``logp = log pi_theta(y_t | y_<t)``  the current policy's log-probability of the sampled token.
* ``logp_old``  the behaviour policy's (the one that sampled); ``logp_ref`` the frozen reference's.
* ``r = exp(logp - logp_old)``  the importance ratio; ``A`` the advantage.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["LOG_RATIO_BOUND", "clamped_log_ratio", "ppo_clipped_surrogate"]

LOG_RATIO_BOUND = 20.0
"""Bound on the exponent of every importance ratio: ``log r`` is clamped to ``[-20, 20]`` before ``exp``
(verl, SkyRL and OpenRLHF use the same 20). ``exp(20) ~ 4.9e8`` is finite in float32 (whose ``exp``
overflows past ~88.7), so a far-off behaviour log-prob (say -100 on a real token) gives a large but
finite loss and a zero, not NaN, gradient on that token (``d clamp / dx = 0`` outside the bound, where an
unclamped ``exp`` would give ``inf * 0 = NaN`` in the backward of the clipped branch)."""


def clamped_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """``clamp(logp - logp_old, -20, 20)`` (:data:`LOG_RATIO_BOUND`), ``[B, T]``; ``logp_old`` detached."""
    return torch.clamp(logprobs - old_logprobs.detach(), -LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def ppo_clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip_c: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate loss per token, with asymmetric clipping and optional dual clip.

    ``loss = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))``  (PPO, Schulman et al. 2017;
    separate bounds are DAPO's clip-higher). With dual clip (Ye et al. 2020) negative-advantage tokens
    are additionally bounded: ``loss = min(loss, -c * A)`` where ``A < 0``, so a huge ratio cannot make
    the loss of a bad action unbounded.
    The exponent ``log r`` is clamped to ``[-20, 20]`` (:data:`LOG_RATIO_BOUND`).

    Args:
        logprobs: ``[B, T]`` current log-probs (carries the gradient).
        old_logprobs: ``[B, T]`` behaviour log-probs (treated as constants).
        advantages: ``[B, T]`` or ``[B]`` (one advantage per row, broadcast over tokens).
        clip_eps_low: ``>= 0``; the ratio is clipped below at ``1 - clip_eps_low``.
        clip_eps_high: ``>= 0``; the ratio is clipped above at ``1 + clip_eps_high``.
        dual_clip_c: ``None`` (off) or ``c > 1``.

    Returns:
        ``(loss, clipped, dual_clipped)``, each ``[B, T]``: the per-token loss (unmasked) and two bool
        tensors marking the tokens where the clipped branch (no gradient through ``r``) and the dual
        clip are the active branch.
    """
    if clip_eps_low < 0 or clip_eps_high < 0:
        raise ValueError(f"clip_eps_low/high must be >= 0, got {clip_eps_low!r}, {clip_eps_high!r}")
    if dual_clip_c is not None and not dual_clip_c > 1:
        raise ValueError(f"dual_clip_c must be > 1 or None, got {dual_clip_c!r}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(logprobs.dtype).expand_as(logprobs)
    ratio = torch.exp(clamped_log_ratio(logprobs, old_logprobs))
    unclipped = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    # Strict '>' so that ties (ratio inside the band) count as unclipped and keep the gradient path.
    clipped = clipped_loss > unclipped
    loss = torch.maximum(unclipped, clipped_loss)
    if dual_clip_c is None:
        return loss, clipped, torch.zeros_like(clipped)
    bound = -dual_clip_c * advantages
    dual_clipped = (advantages < 0) & (loss > bound)
    loss = torch.where(dual_clipped, bound, loss)
    return loss, clipped & ~dual_clipped, dual_clipped
