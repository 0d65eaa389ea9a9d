"""Policy-gradient loss terms per token (pure math: no torch.distributed, no Megatron).

Everything here maps ``[B, T]`` per-token inputs to ``[B, T]`` per-token outputs; aggregation over
tokens, rows, micro-batches and ranks is done elsewhere with the global weights of
:mod:`megatron_rl_agg.parallel.weights` (the math of each mode in :mod:`megatron_rl_agg.core.aggregation`).
This module is the home of the policy losses (the registry :data:`POLICY_LOSSES`: ``ppo_clip``, ``gspo``,
``gspo_token``, ``gmpo``, ``cispo``, ``sapo``, ``dppo_tv``, ``dppo_kl``; see docs/aggregation.md); the KL estimators are in
:mod:`megatron_rl_agg.core.kl`, the full-vocabulary log-prob references in :mod:`megatron_rl_agg.core.logits`.

Notation (per token):

* ``logp = log pi_theta(y_t | y_<t)``  the current policy's log-probability of the sampled token.
* ``logp_old``  the behaviour policy's (the one that sampled); ``logp_ref`` the frozen reference's.
* ``r = exp(logp - logp_old)``  the importance ratio; ``A`` the advantage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

__all__ = ["LOG_RATIO_BOUND", "clamped_log_ratio", "ppo_clipped_surrogate", "PolicyLoss", "POLICY_LOSSES",
           "POLICY_LOSS_ALIASES", "get_policy_loss", "sequence_mean", "TOKEN", "SEQUENCE"]

LOG_RATIO_BOUND = 20.0
"""Bound on the exponent of every importance ratio: ``log r`` is clamped to ``[-20, 20]`` before ``exp``
(verl, SkyRL and OpenRLHF use the same 20). ``exp(20) ~ 4.9e8`` is finite in float32 (whose ``exp``
overflows past ~88.7), so a far-off behaviour log-prob (say -100 on a real token) gives a large but
finite loss and a zero, not NaN, gradient on that token (``d clamp / dx = 0`` outside the bound, where an
unclamped ``exp`` would give ``inf * 0 = NaN`` in the backward of the clipped branch)."""


def clamped_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """``clamp(logp - logp_old, -20, 20)`` (:data:`LOG_RATIO_BOUND`), ``[B, T]``; ``logp_old`` detached."""
    return torch.clamp(logprobs - old_logprobs.detach(), -LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def _clip_min(ratio, advantages, low, high):
    """``max(-A s, -A clip(s, low, high))`` and the clipped indicator (strict ``>``: ties, a ratio
    inside the band, count as unclipped and keep the gradient path)."""
    unclipped = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, low, high)
    clipped = clipped_loss > unclipped
    return torch.maximum(unclipped, clipped_loss), clipped


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
    loss, clipped = _clip_min(ratio, advantages, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    if dual_clip_c is None:
        return loss, clipped, torch.zeros_like(clipped)
    bound = -dual_clip_c * advantages
    dual_clipped = (advantages < 0) & (loss > bound)
    loss = torch.where(dual_clipped, bound, loss)
    return loss, clipped & ~dual_clipped, dual_clipped


# ----------------------------------------------------------------------------------------------
# the registry of policy losses
# ----------------------------------------------------------------------------------------------
# Every loss maps [B, T] tensors to ``(loss, clipped, masked)`` [B, T]: the per-token loss (unmasked; the
# caller masks and aggregates it with the weights of the chosen mode) and two bool indicators (the token's
# ratio is clipped / the token gets no gradient from a trust region or a dual clip). Sequence-level losses
# take ``seq_log_ratio`` [B], the mean over the row's loss tokens of ``seq_token_log_ratio`` (computed by
# the caller, exactly, wherever the row's tokens live), and give every token of a row the row's loss.

TOKEN, SEQUENCE = "token", "sequence"


def _expand(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    return advantages.to(like.dtype).expand_as(like)


def _sequence_ratio(logprobs: torch.Tensor, seq_log_ratio: torch.Tensor) -> torch.Tensor:
    """``exp(clamp(seq_log_ratio, -20, 20))`` as ``[B, 1]`` (from ``[B]``) or ``[B, T]`` (from a per-token
    ``[B, T]``, each token holding its sequence's value: packed rows), dtype of ``logprobs``."""
    shape = None if seq_log_ratio is None else tuple(seq_log_ratio.shape)
    if shape not in ((logprobs.shape[0],), tuple(logprobs.shape)):
        raise ValueError(f"a sequence-level loss needs seq_log_ratio of shape [B] = [{logprobs.shape[0]}] "
                         f"or [B, T] = {list(logprobs.shape)}, got {shape}")
    ratio = torch.exp(seq_log_ratio.to(logprobs.dtype).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    return ratio.unsqueeze(-1) if ratio.dim() == 1 else ratio


def _ppo_clip(logprobs, old_logprobs, advantages, *, seq_log_ratio=None, clip_eps_low, clip_eps_high,
              dual_clip_c=None):
    """PPO clipped surrogate (Schulman et al. 2017), DAPO's asymmetric bounds, optional dual clip
    (Ye et al. 2020): :func:`ppo_clipped_surrogate`; ``masked`` marks the dual-clipped tokens."""
    return ppo_clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps_low=clip_eps_low,
                                 clip_eps_high=clip_eps_high, dual_clip_c=dual_clip_c)


def _gspo(logprobs, old_logprobs, advantages, *, seq_log_ratio, clip_eps_low, clip_eps_high):
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"), sequence level.

    ``s_i = exp(mean_{t in loss tokens of i} log r_{i,t})`` (``seq_log_ratio`` carries the gradient:
    ``d s_i / d logp_{i,t} = s_i / |y_i|``); every token of row ``i`` gets
    ``L_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high))``. The paper's objective is the
    per-sequence mean ``(1 / G) sum_i L_i``: ``seq_mean_token_mean``.
    """
    adv = _expand(advantages, logprobs)
    ratio = _sequence_ratio(logprobs, seq_log_ratio).expand_as(logprobs)
    loss, clipped = _clip_min(ratio, adv, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    return loss, clipped, torch.zeros_like(clipped)


def _gspo_token(logprobs, old_logprobs, advantages, *, seq_log_ratio, clip_eps_low, clip_eps_high):
    """GSPO-token (Zheng et al. 2025, eq. for token-level advantages), token level over a sequence ratio.

    ``s_{i,t} = sg(s_i) * exp(logp_{i,t} - sg(logp_{i,t}))``: the value of ``s_i`` with the gradient
    ``s_i * d logp_{i,t}`` of token ``t`` alone (``seq_log_ratio`` is detached here); each token's loss is
    ``max(-A_{i,t} s_{i,t}, -A_{i,t} clip(s_{i,t}, 1 - eps_low, 1 + eps_high))``. With one advantage per
    row and ``seq_mean_token_mean`` its gradient equals GSPO's.
    """
    adv = _expand(advantages, logprobs)
    base = _sequence_ratio(logprobs, seq_log_ratio.detach())
    ratio = base * torch.exp(logprobs - logprobs.detach())
    loss, clipped = _clip_min(ratio, adv, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    return loss, clipped, torch.zeros_like(clipped)


def _gmpo_token_log_ratio(log_ratio, advantages, *, clip_eps_low, clip_eps_high, **_):
    """GMPO's per-token clipped log-ratio: ``sgn(A) min(sgn(A) x, sgn(A) clip(x, -eps_low, eps_high))``.

    For ``A > 0`` the ratio is capped above at ``e^eps_high`` (below it is free); for ``A < 0`` it is
    floored at ``e^-eps_low`` (above it is free): the pessimistic side, as PPO's min, in log space.
    """
    sign = torch.sign(_expand(advantages, log_ratio))
    clamped = torch.clamp(log_ratio, -clip_eps_low, clip_eps_high)
    return sign * torch.minimum(sign * log_ratio, sign * clamped)


def _gmpo(logprobs, old_logprobs, advantages, *, seq_log_ratio, clip_eps_low, clip_eps_high):
    """GMPO (Zhao et al. 2025, "Geometric-Mean Policy Optimization"), sequence level.

    ``R_i = exp(mean_t l_{i,t})`` with ``l`` GMPO's clipped log-ratio (:func:`_gmpo_token_log_ratio`; the
    caller passes its row mean as ``seq_log_ratio``): the geometric mean of the token ratios, clipped per
    token in log space to ``[-eps_low, eps_high]`` on the side the sign of ``A_i`` makes pessimistic. Every
    token of row ``i`` gets ``L_i = -A_i R_i``; the paper's objective is ``(1 / G) sum_i L_i``
    (``seq_mean_token_mean``). ``clipped`` marks the tokens whose log-ratio was clipped.
    """
    adv = _expand(advantages, logprobs)
    ratio = _sequence_ratio(logprobs, seq_log_ratio).expand_as(logprobs)
    log_ratio = clamped_log_ratio(logprobs, old_logprobs)
    clipped = _gmpo_token_log_ratio(log_ratio, advantages, clip_eps_low=clip_eps_low,
                                    clip_eps_high=clip_eps_high) != log_ratio
    return -adv * ratio, clipped, torch.zeros_like(clipped)


def _cispo(logprobs, old_logprobs, advantages, *, seq_log_ratio=None, clip_eps_low, clip_eps_high):
    """CISPO (MiniMax-M1, 2025): clipped importance-sampling weight, stop-gradient, times the log-prob.

    ``loss_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A_t * logp_t``: every token keeps a gradient
    (``-w_t A_t d logp_t``), the clip only bounds its weight. The paper normalizes by the total token count
    (``token_mean``) and sets no lower bound (``eps_low = 1``: the weight is only floored at 0).
    """
    adv = _expand(advantages, logprobs)
    # The weight is a constant: computed from detached log-probs, so autograd records only the product
    # with logp (no discarded graph for the ratio); the constant factor -w A is formed before it.
    ratio = torch.exp(clamped_log_ratio(logprobs.detach(), old_logprobs))
    weight = torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    clipped = weight != ratio
    return (weight * adv).neg_() * logprobs, clipped, torch.zeros_like(clipped)


def _sapo(logprobs, old_logprobs, advantages, *, seq_log_ratio=None, tau_pos, tau_neg):
    """SAPO (Gao et al. 2025, "Soft Adaptive Policy Optimization"): a soft gate instead of the hard clip.

    ``f(r) = (4 / tau) sigmoid(tau (r - 1))`` with ``tau = tau_pos`` where ``A > 0`` and ``tau_neg``
    where ``A <= 0``; ``loss_t = -f(r_t) A_t``. Its gradient ``-4 sigmoid(x)(1 - sigmoid(x)) r A d logp``
    (``x = tau (r - 1)``) equals the plain policy gradient at ``r = 1`` and fades smoothly away from it,
    faster for negative advantages (``tau_neg > tau_pos``). Nothing is clipped.
    """
    adv = _expand(advantages, logprobs)
    ratio = torch.exp(clamped_log_ratio(logprobs, old_logprobs))
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    none = torch.zeros_like(adv, dtype=torch.bool)
    return -gate * adv, none, none.clone()


def _trust_region_loss(logprobs, old_logprobs, advantages, outside):
    """``-A r`` where the token is inside the trust region, ``-A sg(r)`` (no gradient) where it is outside
    on the side the advantage pushes toward (``A > 0`` and ``p > p_old``, or ``A < 0`` and ``p < p_old``)."""
    adv = _expand(advantages, logprobs)
    ratio = torch.exp(clamped_log_ratio(logprobs, old_logprobs))
    up = logprobs.detach() > old_logprobs.detach()
    masked = outside & (((adv > 0) & up) | ((adv < 0) & ~up))
    ratio = torch.where(masked, ratio.detach(), ratio)
    return -adv * ratio, torch.zeros_like(masked), masked


def _dppo_tv(logprobs, old_logprobs, advantages, *, seq_log_ratio=None, dppo_tv_delta):
    """DPPO with a total-variation trust region (the binary TV of the sampled token).

    ``D_t = |p_t - p_old,t|`` (``p = exp(logp)``, the total variation between the two Bernoulli
    distributions "this token or not"); a token with ``D_t > delta`` on the side its advantage pushes
    toward gets no gradient (``masked``); the others get the importance-weighted ``-A_t r_t``.
    """
    p, p_old = torch.exp(logprobs.detach()), torch.exp(old_logprobs.detach().to(logprobs.dtype))
    return _trust_region_loss(logprobs, old_logprobs, advantages, (p - p_old).abs() > dppo_tv_delta)


def _dppo_kl(logprobs, old_logprobs, advantages, *, seq_log_ratio=None, dppo_kl_delta):
    """DPPO with a KL trust region (binary KL of the sampled token).

    ``D_t = p_old log(p_old / p) + (1 - p_old) log((1 - p_old) / (1 - p))`` (the KL between the Bernoulli
    distributions "this token or not", ``p`` clamped to ``[1e-12, 1 - 1e-12]``); masking as in ``dppo_tv``.
    """
    eps = 1e-12
    p = torch.exp(logprobs.detach()).clamp(eps, 1 - eps)
    q = torch.exp(old_logprobs.detach().to(logprobs.dtype)).clamp(eps, 1 - eps)
    kl = q * (q.log() - p.log()) + (1 - q) * (torch.log1p(-q) - torch.log1p(-p))
    return _trust_region_loss(logprobs, old_logprobs, advantages, kl > dppo_kl_delta)


def _identity_log_ratio(log_ratio, advantages, **_):
    return log_ratio


@dataclass(frozen=True)
class PolicyLoss:
    """One registered policy loss."""

    name: str
    level: str
    """``"token"`` or ``"sequence"`` (a per-row ratio from ``seq_log_ratio``; every token gets the row's
    loss)."""
    params: Mapping[str, Optional[float]]
    """``LossConfig`` field -> the paper's default (the value used when the field is unset)."""
    fn: Callable
    """``fn(logp, logp_old, A, *, seq_log_ratio, **params) -> (loss, clipped, masked)``, each ``[B, T]``."""
    paper_mode: str
    """The aggregation mode that reproduces the paper's objective."""
    reference: str
    seq_token_log_ratio: Optional[Callable] = None
    """Sequence level: ``(clamped log r [B, T], A, **params) -> [B, T]``, whose mean over a row's loss tokens
    the caller passes as ``seq_log_ratio``."""
    masked_metric: Optional[str] = None
    """Report name (``<name>/mean``) of the fraction of loss tokens the ``masked`` indicator marks, for a loss
    whose mask is part of its definition (DPPO's tokens outside the trust region: ``masked_frac``)."""

    def __call__(self, logprobs, old_logprobs, advantages, *, seq_log_ratio=None, **params):
        return self.fn(logprobs, old_logprobs, advantages, seq_log_ratio=seq_log_ratio, **params)


_CLIP = ("clip_eps_low", "clip_eps_high")
POLICY_LOSSES: dict[str, PolicyLoss] = {p.name: p for p in (
    PolicyLoss("ppo_clip", TOKEN, {"clip_eps_low": 0.2, "clip_eps_high": 0.2, "dual_clip_c": None}, _ppo_clip,
               "token_mean", "Schulman et al. 2017 (PPO); DAPO clip-higher; Ye et al. 2020 dual clip"),
    PolicyLoss("gspo", SEQUENCE, dict(zip(_CLIP, (3e-4, 4e-4))), _gspo, "seq_mean_token_mean",
               "Zheng et al. 2025 (GSPO)", _identity_log_ratio),
    PolicyLoss("gspo_token", SEQUENCE, dict(zip(_CLIP, (3e-4, 4e-4))), _gspo_token, "seq_mean_token_mean",
               "Zheng et al. 2025 (GSPO-token)", _identity_log_ratio),
    PolicyLoss("gmpo", SEQUENCE, dict(zip(_CLIP, (0.4, 0.4))), _gmpo, "seq_mean_token_mean",
               "Zhao et al. 2025 (GMPO)", _gmpo_token_log_ratio),
    PolicyLoss("cispo", TOKEN, dict(zip(_CLIP, (1.0, 0.28))), _cispo, "token_mean", "MiniMax-M1 2025 (CISPO)"),
    PolicyLoss("sapo", TOKEN, {"tau_pos": 1.0, "tau_neg": 1.05}, _sapo, "seq_mean_token_mean",
               "Gao et al. 2025 (SAPO)"),
    PolicyLoss("dppo_tv", TOKEN, {"dppo_tv_delta": 0.2}, _dppo_tv, "token_mean", "DPPO, TV trust region",
               masked_metric="masked_frac"),
    PolicyLoss("dppo_kl", TOKEN, {"dppo_kl_delta": 0.05}, _dppo_kl, "token_mean", "DPPO, KL trust region",
               masked_metric="masked_frac"),
)}

POLICY_LOSS_ALIASES = {"vanilla": "ppo_clip", "ppo": "ppo_clip", "geo_mean": "gmpo", "dppo": "dppo_tv",
                       "dppo_binary_tv": "dppo_tv", "dppo_binary_kl": "dppo_kl"}


def get_policy_loss(name: str) -> PolicyLoss:
    """The registered loss ``name`` (case-insensitive, ``-`` as ``_``, peers' aliases such as verl's
    ``vanilla`` and ``geo_mean``); a ValueError lists the valid names."""
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    key = POLICY_LOSS_ALIASES.get(key, key)
    if key not in POLICY_LOSSES:
        aliases = ", ".join(f"{a} -> {c}" for a, c in POLICY_LOSS_ALIASES.items())
        raise ValueError(f"unknown policy loss {name!r}; valid: {', '.join(POLICY_LOSSES)} (aliases: {aliases})")
    return POLICY_LOSSES[key]


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean of ``values`` over each row's loss tokens: ``sum_t m v / max(sum_t m, 1)`` (the count
    clamped, not branched on: a row without loss tokens gives 0). Single-process form of what the loss
    computes across context-parallel ranks (numerator and count reduced over the CP group)."""
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp(min=1)
