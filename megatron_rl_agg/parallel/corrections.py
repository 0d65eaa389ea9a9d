"""Off-policy importance weights of one mini-batch, self-normalized over every data-parallel rank.

:func:`mini_batch_importance_weights` applies :func:`megatron_rl_agg.core.corrections.importance_weights`
to this rank's full rows and, when asked, divides by the mean weight over the WHOLE mini-batch's counted
loss tokens (one all-reduce of ``[sum w, count]`` over the DP group, once per mini-batch: never per
micro-batch and never inside the loss function, so it cannot depend on the micro-batch split nor hang a
pipeline stage that never calls the loss). The CP ranks of a DP rank hold the same full rows, so the DP
group (without CP) is the right group, as for the aggregation counts.
"""

from __future__ import annotations

import torch

from megatron_rl_agg.core.corrections import ISWeights, importance_weights, self_normalize
from megatron_rl_agg.parallel import dist

__all__ = ["mini_batch_importance_weights"]


def mini_batch_importance_weights(prox: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor, loss_config,
                                  dp_group=None) -> ISWeights:
    """:class:`ISWeights` of this rank's rows (``[B, T]`` each) under the ``is_*`` fields of ``loss_config``.

    With ``is_self_normalize`` the weights are ``w * n / s``, ``s`` and ``n`` the sums of ``w`` and of the
    counted mask over every DP rank's rows (one ``all_reduce_sum`` over ``dp_group``).
    """
    out = importance_weights(prox, behaviour, mask, level=loss_config.is_level, mode=loss_config.is_mode,
                             low=loss_config.is_low, high=loss_config.is_high, veto=loss_config.is_veto,
                             denominator=loss_config.is_denominator)
    if not loss_config.is_self_normalize or loss_config.is_level == "off":
        return out
    local = torch.stack([(out.weights * out.counted).sum(), out.counted.sum()])
    total = dist.all_reduce_sum(local, dp_group)
    return out._replace(weights=self_normalize(out.weights, total))
