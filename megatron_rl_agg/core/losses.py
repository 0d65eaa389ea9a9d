"""Per-token RL loss terms (pure math: no torch.distributed, no Megatron).

Everything here maps ``[B, T]`` per-token inputs to ``[B, T]`` per-token outputs; aggregation over
tokens, rows, micro-batches and ranks is done elsewhere with the global weights of
:mod:`megatron_rl_agg.core.aggregation`.

Notation (per token):

* ``logp = log pi_theta(y_t | y_<t)``  the current policy's log-probability of the sampled token.
* ``logp_old``  the behaviour policy's (the one that sampled); ``logp_ref`` the frozen reference's.
* ``r = exp(logp - logp_old)``  the importance ratio; ``A`` the advantage.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = [
    "KL_ESTIMATORS",
    "ppo_clipped_surrogate",
    "kl_estimate",
    "get_kl_estimator",
    "register_kl_estimator",
    "logprobs_from_logits",
    "entropy_from_logits",
]


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
    ratio = torch.exp(logprobs - old_logprobs.detach())
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


# ----------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL Divergence", 2020). Tokens are sampled from pi_theta,
# so with d = logp - logp_ref the estimators of KL(pi_theta || pi_ref) are
#   k1 = d                        unbiased, high variance, can be negative
#   k2 = d^2 / 2                  biased, low variance, >= 0
#   k3 = exp(-d) - 1 + d          unbiased, low variance, >= 0  (the GRPO paper's choice)
# ----------------------------------------------------------------------------------------------

_KL_REGISTRY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


def register_kl_estimator(name: str):
    """Decorator registering ``fn(d: [B, T]) -> [B, T]`` under ``name``; a duplicate name raises."""

    def wrap(fn):
        if name in _KL_REGISTRY:
            raise ValueError(f"KL estimator {name!r} registered twice")
        _KL_REGISTRY[name] = fn
        return fn

    return wrap


@register_kl_estimator("k1")
def _k1(d: torch.Tensor) -> torch.Tensor:
    return d


@register_kl_estimator("k2")
def _k2(d: torch.Tensor) -> torch.Tensor:
    return 0.5 * d * d


@register_kl_estimator("k3")
def _k3(d: torch.Tensor) -> torch.Tensor:
    # expm1 keeps exp(-d) - 1 accurate when d is tiny (the usual case early in training).
    return torch.expm1(-d) + d


KL_ESTIMATORS: tuple[str, ...] = tuple(_KL_REGISTRY)
"""Registered estimator names: ``("k1", "k2", "k3")``."""


def get_kl_estimator(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The estimator registered as ``name``; a ValueError lists the valid names."""
    if name not in _KL_REGISTRY:
        raise ValueError(f"unknown KL estimator {name!r}; valid: {', '.join(_KL_REGISTRY)}")
    return _KL_REGISTRY[name]


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of ``KL(pi_theta || pi_ref)``.

    Args:
        logprobs: ``[B, T]`` current log-probs of the sampled tokens (carries the gradient).
        ref_logprobs: ``[B, T]`` reference log-probs of the same tokens (constants).
        estimator: ``k1``, ``k2`` or ``k3`` (see the table above this function).

    Returns:
        ``[B, T]`` unmasked per-token estimates.
    """
    return get_kl_estimator(estimator)(logprobs - ref_logprobs.detach())


# ----------------------------------------------------------------------------------------------
# Full-vocabulary references (single device). The Megatron path computes the same quantities on a
# vocab-split logits tensor without gathering it; tests compare the two.
# ----------------------------------------------------------------------------------------------

def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[label]``: ``logits [B, T, V]``, ``labels [B, T]`` -> ``[B, T]`` (float32+)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``H = -sum_v p_v log p_v`` of ``softmax(logits)``: ``[B, T, V]`` -> ``[B, T]`` (float32+)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)
