"""KL estimators between the current policy and the frozen reference, per token (pure math).

Schulman, "Approximating KL Divergence" (2020). Tokens are sampled from pi_theta, so with
``d = logp - logp_ref`` the estimators of ``KL(pi_theta || pi_ref)`` are

* ``k1 = d``                      unbiased, high variance, can be negative;
* ``k2 = d^2 / 2``                biased, low variance, >= 0;
* ``k3 = exp(-d) - 1 + d``        unbiased, low variance, >= 0 (the GRPO paper's choice); the exponent
  is clamped to ``[-20, 20]`` (``policy_losses.LOG_RATIO_BOUND``).

One registry (:func:`register_kl_estimator`); :func:`get_kl_estimator` lists the valid names on error.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_rl_agg.core.policy_losses import LOG_RATIO_BOUND

__all__ = ["KL_ESTIMATORS", "kl_estimate", "get_kl_estimator", "register_kl_estimator"]

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
    # expm1 keeps exp(-d) - 1 accurate when d is tiny (the usual case early in training). The exponent is
    # clamped to [-20, 20] like every ratio's (policy_losses.LOG_RATIO_BOUND): finite in float32.
    return torch.expm1(-d.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)) + d


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


KL_ESTIMATORS: tuple[str, ...] = tuple(_KL_REGISTRY)
"""Registered estimator names: ``("k1", "k2", "k3")``."""
