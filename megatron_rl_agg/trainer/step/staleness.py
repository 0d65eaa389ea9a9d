"""Per-token staleness of off-policy rollouts: ``--max-staleness`` and the staleness metrics.

A token sampled by weights of policy version ``v`` (optimizer steps applied to them; initial weights 0)
and trained on at step ``k`` (from 1; step ``k`` updates version ``k - 1`` to ``k``) has staleness
``s = (k - 1) - v >= 0`` (a version above ``k - 1`` is refused before step 1:
:meth:`megatron_rl_agg.trainer.rollout.sources.OfflineSource.check_versions`). With
``--max-staleness K`` the loss tokens with ``s > K`` ("stale") are, by ``--staleness-mode``:

* ``drop``: out of the loss mask, so out of the policy, KL and entropy terms AND out of every aggregation
  denominator (token counts, the per-row counts of ``seq_mean_*``, a row left with no token leaves the
  row and group counts), as if the engine had not sampled them;
* ``mask``: their advantage is set to 0, so they carry no policy gradient, but they stay in the loss
  mask: counted in every aggregation denominator, in the sequence-level ratios of ``gspo`` / ``gmpo``, in
  the KL and entropy terms and in the metrics (the policy term of ``token_mean`` is then
  ``-sum_{fresh} A r / N_all`` instead of drop's ``/ N_fresh``).

Neither changes the group advantage statistics (rewards are per row, computed before). The metrics
(:func:`apply_max_staleness`) are exact over the DP ranks: one all-reduce(sum) of the counts and one
all-reduce(max) of the largest staleness per mini-batch, over the loss tokens before the filter.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_rl_agg.parallel import dist

__all__ = ["STALENESS_MODES", "apply_max_staleness", "combine_staleness"]

STALENESS_MODES = ("drop", "mask")

# Summed over DP ranks and the mini-batches of a step (combine_staleness turns them into the metrics).
_COUNTS = ("staleness_tokens", "staleness_sum", "staleness_n0", "staleness_n1", "staleness_ngt1",
           "num_stale_tokens")


def apply_max_staleness(versions: Optional[torch.Tensor], loss_mask: torch.Tensor, advantages: torch.Tensor,
                        step: int, max_staleness: Optional[int], mode: str, dp_group=None
                        ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Apply ``--max-staleness`` to one DP rank's rows of a mini-batch of step ``step``.

    Args:
        versions: ``[R, S]`` int64 policy version of each token (None: a rank without rows; then
            ``loss_mask`` has no token either).
        loss_mask: ``[R, S]`` 0/1 loss mask after the advantage policy.
        advantages: ``[R]`` or ``[R, S]`` advantages.
        max_staleness: ``K`` (None: no limit; only the metrics).
        mode: ``"drop"`` or ``"mask"`` (module docstring).

    Returns:
        ``(loss_mask, advantages, counts)``: the mask (``drop``: times ``s <= K``), the advantages
        (``mask``: ``[R, S]``, times ``s <= K``) and the DP-global counts of the loss tokens before the
        filter: ``staleness_tokens`` (their number), ``staleness_sum`` (sum of s), ``staleness_n0`` /
        ``_n1`` / ``_ngt1`` (tokens with s = 0, 1, > 1), ``num_stale_tokens`` (s > K),
        ``staleness_max`` (max s, 0 without tokens).
    """
    if mode not in STALENESS_MODES:
        raise ValueError(f"staleness mode {mode!r} is not one of {list(STALENESS_MODES)}")
    if versions is None:
        versions = torch.zeros(loss_mask.shape, dtype=torch.int64, device=loss_mask.device)
    real = loss_mask != 0
    staleness = torch.where(real, (step - 1) - versions, torch.zeros_like(versions))
    stale = real & (staleness > max_staleness) if max_staleness is not None else torch.zeros_like(real)
    f64 = torch.float64
    sums = torch.stack([real.sum().to(f64), staleness.sum().to(f64), (real & (staleness == 0)).sum().to(f64),
                        (real & (staleness == 1)).sum().to(f64), (staleness > 1).sum().to(f64),
                        stale.sum().to(f64)])
    sums = dist.all_reduce_sum(sums, dp_group).tolist()
    top = dist.all_reduce_max(staleness.max().reshape(1) if staleness.numel() else
                              torch.zeros(1, dtype=torch.int64, device=loss_mask.device), dp_group)
    counts = {key: int(round(v)) for key, v in zip(_COUNTS, sums)}
    counts["staleness_max"] = int(top.item())
    fresh = (~stale).to(loss_mask.dtype)
    if mode == "drop":
        loss_mask = loss_mask * fresh
    else:
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1).expand_as(loss_mask)
        advantages = advantages * fresh.to(advantages.dtype)
    return loss_mask, advantages, counts


def combine_staleness(parts: list[dict]) -> dict:
    """The step's staleness metrics from the counts of its mini-batches (:func:`apply_max_staleness`):
    ``staleness_mean``, ``staleness_max``, ``staleness_frac_0`` / ``_1`` / ``_gt1`` (fractions of the loss
    tokens before the filter; 0 without tokens) and ``num_stale_tokens`` (dropped or masked)."""
    total = {key: sum(p[key] for p in parts) for key in _COUNTS}
    n = max(total["staleness_tokens"], 1)
    return {"staleness_mean": total["staleness_sum"] / n, "staleness_max": max(p["staleness_max"] for p in parts),
            "staleness_frac_0": total["staleness_n0"] / n, "staleness_frac_1": total["staleness_n1"] / n,
            "staleness_frac_gt1": total["staleness_ngt1"] / n, "num_stale_tokens": total["num_stale_tokens"]}
