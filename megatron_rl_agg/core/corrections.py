"""Off-policy correction: importance weights between the proximal and the behaviour policy (pure math).

Three policies meet in the loss (decoupled PPO, AReaL): the behaviour policy ``pi_behave`` that sampled
the tokens (an inference engine, possibly some steps behind), the proximal policy ``pi_prox`` (the "old"
log-probs of PPO: recomputed by the trainer before the update, or taken from the rollout file) and the
current policy ``pi_theta``. The policy loss clips on ``pi_theta / pi_prox`` and each token's loss is
multiplied by an importance weight ``w`` built from ``pi_prox / pi_behave``. ``w`` depends only on
inputs (both log-prob sets are constants), so it is computed once per mini-batch on the full rows.

Per loss token ``t`` of row ``i``, ``d_it = logp_prox - logp_behave`` (the token log-ratio). The level
gives the log-weight (clamped to ``[-20, 20]`` before ``exp``, the bound of every ratio,
:data:`megatron_rl_agg.core.policy_losses.LOG_RATIO_BOUND`: ``exp(20) ~ 4.9e8`` stays finite in
float32, and a sum over thousands of tokens cannot overflow to inf or underflow to an exact 0):

* ``token``      ``w_it = exp(d_it)``                           (slime TIS, NeMo-RL ``tis``, AReaL)
* ``sequence``   ``w_i  = exp(sum_t d_it)``  the product         (TRL, verl, NeMo-RL sequence)
* ``geometric``  ``w_i  = exp(mean_t d_it)`` the geometric mean  (slime, SkyRL, AReaL, NeMo-RL seq-mask)

sums and means over the row's loss tokens; a sequence weight is broadcast to the row's tokens. Then the
treatment, with bounds ``low <= high``:

* ``truncate``  ``min(w, high)``                   (TIS: upper cap; the flag "truncated")
* ``clip``      ``min(max(w, low), high)``         (two-sided; "truncated" on either side)
* ``mask``      ``w`` inside ``[low, high]``, else 0  (MIS / IcePop; "masked")

Rejection (``veto = v`` in ``(0, 1)``, SkyRL's outlier-token veto, slime's veto): a whole row gets weight
0 ("rejected") when any of its loss tokens has ``exp(d_it) < v`` or ``exp(d_it) > 1 / v``.

Denominator after rejection: ``keep_count`` (AReaL, slime, NeMo-RL, SkyRL) keeps zero-weight tokens
(masked or rejected) in the loss mask, so they still count in every aggregation denominator;
``survivors`` (verl) removes them from the loss mask BEFORE the aggregation weights are computed.

Self-normalization (optional): ``w <- w * n / sum(w)`` with the sums over the mini-batch's counted loss
tokens (every DP rank's; the all-reduce is :mod:`megatron_rl_agg.parallel.corrections`), so the weighted
token count equals the token count; all-zero weights stay 0 (no division by zero).

Registries: :func:`get_is_level` and :func:`get_is_mode` list the valid names on error.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from megatron_rl_agg.core.kl import get_kl_estimator
from megatron_rl_agg.core.policy_losses import LOG_RATIO_BOUND

__all__ = ["IS_LEVELS", "IS_MODES", "IS_DENOMINATORS", "LOSS_TOKEN", "TRUNCATED", "MASKED", "REJECTED",
           "ISWeights", "get_is_level", "get_is_mode", "register_is_level", "register_is_mode",
           "check_is_settings", "importance_weights", "self_normalize", "correction_metrics"]

# Bits of the per-token flags tensor (int8): which tokens were counted and what the treatment did.
LOSS_TOKEN, TRUNCATED, MASKED, REJECTED = 1, 2, 4, 8

_LEVELS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
_MODES: dict[str, Callable[[torch.Tensor, float, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}


def register_is_level(name: str):
    """Decorator registering ``fn(d [B, T] masked log-ratios, mask [B, T] float) -> [B, T] log-weights``."""
    def wrap(fn):
        if name in _LEVELS:
            raise ValueError(f"IS level {name!r} registered twice")
        _LEVELS[name] = fn
        return fn
    return wrap


def register_is_mode(name: str):
    """Decorator registering ``fn(w [B, T], low, high) -> (w', truncated [B, T] bool, masked [B, T] bool)``."""
    def wrap(fn):
        if name in _MODES:
            raise ValueError(f"IS mode {name!r} registered twice")
        _MODES[name] = fn
        return fn
    return wrap


@register_is_level("token")
def _token(d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return d


@register_is_level("sequence")
def _sequence(d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return d.sum(-1, keepdim=True).expand_as(d)                        # log of the product


@register_is_level("geometric")
def _geometric(d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # A row without loss tokens has sum 0 over count clamped to 1: weight 1 on no token.
    return (d.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(d)


@register_is_mode("truncate")
def _truncate(w: torch.Tensor, low: float, high: float):
    over = w > high
    return w.clamp(max=high), over, torch.zeros_like(over)


@register_is_mode("clip")
def _clip(w: torch.Tensor, low: float, high: float):
    out = (w > high) | (w < low)
    return w.clamp(min=low, max=high), out, torch.zeros_like(out)


@register_is_mode("mask")
def _mask(w: torch.Tensor, low: float, high: float):
    out = (w > high) | (w < low)
    return torch.where(out, 0.0, w), torch.zeros_like(out), out


def get_is_level(name: str) -> Callable:
    """The level registered as ``name``; a ValueError lists the valid names."""
    if name not in _LEVELS:
        raise ValueError(f"unknown is_level {name!r}; valid: off, {', '.join(_LEVELS)}")
    return _LEVELS[name]


def get_is_mode(name: str) -> Callable:
    """The treatment registered as ``name``; a ValueError lists the valid names."""
    if name not in _MODES:
        raise ValueError(f"unknown is_mode {name!r}; valid: {', '.join(_MODES)}")
    return _MODES[name]


IS_LEVELS: tuple[str, ...] = ("off",) + tuple(_LEVELS)
"""``("off", "token", "sequence", "geometric")``."""
IS_MODES: tuple[str, ...] = tuple(_MODES)
"""``("truncate", "clip", "mask")``."""
IS_DENOMINATORS: tuple[str, ...] = ("keep_count", "survivors")


def check_is_settings(level: str, mode: str, low: float, high: float, veto: Optional[float],
                      denominator: str) -> None:
    """Raise a ValueError naming the flag for an inconsistent correction setting (bounds already finite)."""
    if level not in IS_LEVELS:
        raise ValueError(f"--is-level must be one of {', '.join(IS_LEVELS)}; got {level!r}")
    if mode not in IS_MODES:
        raise ValueError(f"--is-mode must be one of {', '.join(IS_MODES)}; got {mode!r}")
    if denominator not in IS_DENOMINATORS:
        raise ValueError(f"--is-denominator must be one of {', '.join(IS_DENOMINATORS)}; got {denominator!r}")
    if low > high:
        raise ValueError(f"--is-low={low!r} is above --is-high={high!r}: the bounds need low <= high")
    if high <= 0:
        raise ValueError(f"--is-high must be > 0, got {high!r}")
    if veto is not None:
        if not 0 < veto < 1:
            raise ValueError(f"--is-veto must be in (0, 1) (a row is rejected when a token ratio is below it "
                             f"or above its inverse), got {veto!r}")
        if mode != "truncate" and veto > low:
            raise ValueError(f"--is-veto={veto!r} is above the lower bound --is-low={low!r} of is_mode={mode!r}: "
                             "the veto must lie beyond the bounds (veto <= low and 1/veto >= high)")
        if 1.0 / veto < high:
            raise ValueError(f"1 / --is-veto = {1.0 / veto:g} is below --is-high={high!r}: the veto must lie "
                             "beyond the bounds (veto <= low and 1/veto >= high)")


class ISWeights(NamedTuple):
    """Output of :func:`importance_weights` (all ``[B, T]``)."""
    weights: torch.Tensor    # float64 per-token weight (0 off the loss mask, masked and rejected tokens)
    log_ratio: torch.Tensor  # float64 token log-ratio logp_prox - logp_behave (0 off the loss mask)
    flags: torch.Tensor      # int8 bits LOSS_TOKEN | TRUNCATED | MASKED | REJECTED
    counted: torch.Tensor    # float64 0/1 loss mask for the aggregation counts (the denominator policy)


def importance_weights(prox: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor, *, level: str,
                       mode: str = "truncate", low: float = 0.0, high: float = 2.0,
                       veto: Optional[float] = None, denominator: str = "keep_count") -> ISWeights:
    """Per-token importance weights ``pi_prox / pi_behave`` with the level, treatment, rejection and
    denominator policy of the module docstring (no self-normalization: see :func:`self_normalize`).

    Args:
        prox: ``[B, T]`` proximal ("old") log-probs of the sampled tokens.
        behaviour: ``[B, T]`` behaviour log-probs of the same tokens.
        mask: ``[B, T]`` 0/1 loss mask.
        level: ``off`` (weight 1 everywhere: only the mismatch is measured), ``token``, ``sequence``,
            ``geometric``.
        mode, low, high, veto, denominator: as in :func:`check_is_settings`.

    Returns:
        :class:`ISWeights`.
    """
    check_is_settings(level, mode, low, high, veto, denominator)
    m = mask.to(torch.float64)
    on = m > 0
    d = torch.where(on, prox.to(torch.float64) - behaviour.to(torch.float64), 0.0)
    flags = on.to(torch.int8) * LOSS_TOKEN
    if level == "off":
        return ISWeights(m.clone(), d, flags, m.clone())
    log_w = get_is_level(level)(d, m).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    w, truncated, masked = get_is_mode(mode)(torch.exp(log_w), low, high)
    if veto is not None:
        lv = math.log(veto)
        outlier = on & ((d < lv) | (d > -lv))
        rejected = outlier.any(-1, keepdim=True).expand_as(on) & on
    else:
        rejected = torch.zeros_like(on)
    w = torch.where(on & ~rejected, w, 0.0)
    flags = (flags + (on & truncated & ~rejected).to(torch.int8) * TRUNCATED
             + (on & masked & ~rejected).to(torch.int8) * MASKED + rejected.to(torch.int8) * REJECTED)
    dropped = rejected | (on & masked)
    counted = m if denominator == "keep_count" else torch.where(dropped, 0.0, m)
    return ISWeights(w, d, flags, counted)


def self_normalize(weights: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``w * n / s`` with ``total = [s, n]`` the mini-batch sums of the weights and of the counted tokens
    (all DP ranks); ``s = 0`` (every weight 0) leaves the weights 0. ``weights``: ``[B, T]`` float64."""
    s, n = total[0], total[1]
    return torch.where(s > 0, weights * (n / torch.where(s > 0, s, 1.0)), 0.0)


def correction_metrics(weights: torch.Tensor, log_ratio: torch.Tensor, flags: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
    """Exactly reducible metrics of one micro-batch (or CP shard) of correction tensors, all ``[b, s]``.

    Over the loss tokens (flag ``LOSS_TOKEN``: the mask before any rejection), in the suffix convention of
    :mod:`megatron_rl_agg.core.metrics`: ``is_weight/mean|max|min`` (the applied weight, after treatment,
    rejection and self-normalization; ``max`` / ``min`` of no token are ``-inf`` / ``+inf``, neutral in the
    reduction), ``is_weight_sq/mean`` (effective sample size fraction = ``mean^2 / mean of squares``),
    ``mismatch_kl_k1/mean`` and ``mismatch_kl_k3/mean`` (Schulman's estimators of ``KL(pi_behave || pi_prox)``
    with ``d = logp_behave - logp_prox``: ``k1 = d``, ``k3 = exp(-d) - 1 + d``), and the fractions
    ``is_truncated_frac/mean``, ``is_masked_frac/mean``, ``is_rejected_frac/mean``. No host read.
    """
    on = (flags & LOSS_TOKEN) > 0
    n = on.sum().to(torch.float64)
    w = weights.detach().to(torch.float64)
    d = -log_ratio.to(torch.float64)

    def mean(values: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.where(on, values.to(torch.float64), 0.0).sum(), n])

    return {
        "is_weight/mean": mean(w),
        "is_weight/max": torch.where(on, w, -math.inf).amax() if w.numel() else torch.tensor(-math.inf),
        "is_weight/min": torch.where(on, w, math.inf).amin() if w.numel() else torch.tensor(math.inf),
        "is_weight_sq/mean": mean(w * w),
        "mismatch_kl_k1/mean": mean(get_kl_estimator("k1")(d)),
        "mismatch_kl_k3/mean": mean(get_kl_estimator("k3")(d)),
        "is_truncated_frac/mean": mean((flags & TRUNCATED) > 0),
        "is_masked_frac/mean": mean((flags & MASKED) > 0),
        "is_rejected_frac/mean": mean((flags & REJECTED) > 0),
    }
