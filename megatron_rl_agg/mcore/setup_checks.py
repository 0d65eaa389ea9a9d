"""Setups the loss cannot scale exactly, refused before a step runs (with the reason).

:func:`check_megatron_setup` compares the micro-batches of
:func:`megatron_rl_agg.mcore.batch.prepare_microbatches` with the model's ``TransformerConfig`` and DDP
config (``calculate_per_token_loss``, ``average_in_collective``, the context-parallel size);
:func:`check_moe_setup` refuses the MoE aux-loss setting megatron-core itself mis-scales where the
installed release lacks the upstream fix (detected once per process from the release version).
The gradient-scale contract these refusals protect is derived in :mod:`megatron_rl_agg.mcore.loss`.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

from megatron.core import parallel_state

__all__ = ["check_megatron_setup", "check_moe_setup"]


def check_megatron_setup(model_config: Any, micro_batch: Optional[Mapping[str, Any]] = None,
                         ddp_config: Any = None) -> None:
    """Raise ValueError for a Megatron setup the prepared micro-batches cannot scale exactly.

    Args:
        model_config: the model's ``TransformerConfig`` (``megatron.core.utils.get_model_config(model)``).
        micro_batch: one dict from :func:`prepare_microbatches` (None: check the config alone).
        ddp_config: the DDP wrapper's ``DistributedDataParallelConfig`` (None: not checked).

    Refused, each with its reason:

    - ``calculate_per_token_loss=True`` with micro-batches prepared without it: the loss would return a
      2-tuple, which the schedule scales by ``C / M`` whatever the flag, while DDP under the flag SUMS the
      gradients over the dp x cp ranks (no ``1 / (D C)`` pre-scale) and ``finalize_model_grads`` skips its
      division by the token total (0: a 2-tuple reports none): the gradient would come out ``D * C`` times
      too large (``D`` times without CP).
      And the converse (micro-batches for the flag, a model without it): the schedule would divide each
      ``N``-scaled 3-tuple loss by its ``n`` and ``M``, a factor ``N / (n M)`` too large.
    - ``calculate_per_token_loss=True`` with ``average_in_collective=True``: Megatron then divides the
      summed gradient by the dp x cp size as well as by the token total (megatron-core asserts against it).
    - micro-batches prepared for another context-parallel size than the model's.
    """
    check_moe_setup(model_config)
    flag = bool(getattr(model_config, "calculate_per_token_loss", False))
    if flag and ddp_config is not None and getattr(ddp_config, "average_in_collective", False):
        raise ValueError(
            "calculate_per_token_loss=True cannot be combined with average_in_collective=True: under the flag "
            "the gradient is a SUM over dp x cp ranks divided once by the total token count, and "
            "average_in_collective would divide it by the dp x cp size as well. Set "
            "average_in_collective=False (the default), or calculate_per_token_loss=False")
    model_cp = max(int(getattr(model_config, "context_parallel_size", 1) or 1),
                   parallel_state.get_context_parallel_world_size()
                   if parallel_state.model_parallel_is_initialized() else 1)
    if micro_batch is None:
        return
    prepared = bool(micro_batch.get("calculate_per_token_loss", False))
    if flag and not prepared:
        raise ValueError(
            "the model has calculate_per_token_loss=True but the micro-batches were prepared without it: the "
            "loss would return a 2-tuple, which the schedule scales by cp/M whatever the flag while DDP sums "
            "(instead of averaging) over the dp x cp ranks, so every gradient would be D x CP times too large "
            "(D times without context parallelism). "
            "Pass calculate_per_token_loss=True to prepare_microbatches (the loss then returns Megatron's "
            "3-tuple), or set calculate_per_token_loss=False in the TransformerConfig")
    if prepared and not flag:
        raise ValueError(
            "the micro-batches were prepared with calculate_per_token_loss=True but the model's "
            "TransformerConfig has calculate_per_token_loss=False: the schedule would divide each 3-tuple "
            "loss by its token count and DDP average it, not the scale the loss was built for. Make both "
            "agree (prepare_microbatches(..., calculate_per_token_loss=...) and the TransformerConfig)")
    if micro_batch.get("cp_size", 1) != model_cp:
        raise ValueError(
            f"micro-batches were prepared for context-parallel size {micro_batch.get('cp_size', 1)} but the "
            f"model's is {model_cp}: pass cp_group=parallel_state.get_context_parallel_group() to "
            "prepare_microbatches")


# The first megatron-core release whose router has the NVIDIA/Megatron-LM#5047 fix (``tp_cp_group.size()`` in
# ``TopKRouter.attach_and_log_load_balancing_loss``), read from Megatron-LM's history: the fix (9ef8a2a,
# 2026-06-02) precedes the commit that set the version to 0.19 (7a7f7b4), so 0.19.0 and every later
# release have it; 0.16.x, 0.17.x and 0.18.x (up to 0.18.3) lack it. ``release`` drops the pre-release /
# ``+git`` suffixes, so a 0.19 build of any kind counts as 0.19. (A main-branch build between the fix and
# the bump, still numbered 0.18, would be refused though fixed: the safe side.)
_ROUTER_FIX_RELEASE = (0, 19)


@functools.cache
def _router_scales_aux_by_tp_cp() -> bool:
    """Whether this megatron-core's router multiplies the per-token aux-loss scale by the TP x CP size
    (the fix of NVIDIA/Megatron-LM#5047), from its release version (once per process)."""
    import megatron.core
    from packaging.version import Version

    return Version(megatron.core.__version__).release >= _ROUTER_FIX_RELEASE


def check_moe_setup(model_config: Any) -> None:
    """Raise ValueError for an MoE setting whose aux-loss gradient megatron-core itself mis-scales.

    With ``calculate_per_token_loss=True`` the router multiplies each micro-batch's aux loss by its
    LOCAL routed-token count, which under TP (sequence parallel) or CP is the shard's ``b * s / (TP * CP)``,
    while ``finalize_model_grads`` divides by the full count: the aux-loss gradient comes out ``TP * CP``
    times too small (measured: exactly 0.5x at TP2 + SP, EP2, both dispatchers, against the same
    micro-batches without the flag; exact at TP1). NVIDIA/Megatron-LM#5047 fixes it upstream by a
    ``tp_cp_group.size()`` factor; where the installed router lacks it, the combination is refused.
    """
    if not getattr(model_config, "num_moe_experts", None) or not getattr(model_config, "calculate_per_token_loss",
                                                                           False):
        return
    aux_coeff = getattr(model_config, "moe_aux_loss_coeff", 0.0)
    aux_on = any(c > 0 for c in aux_coeff) if isinstance(aux_coeff, (list, tuple)) else aux_coeff > 0
    aux_on = aux_on or bool(getattr(model_config, "moe_z_loss_coeff", None))
    tp_cp = (int(getattr(model_config, "tensor_model_parallel_size", 1) or 1)
             * int(getattr(model_config, "context_parallel_size", 1) or 1))
    if aux_on and tp_cp > 1 and not _router_scales_aux_by_tp_cp():
        raise ValueError(
            f"calculate_per_token_loss=True with an MoE aux / z loss at TP x CP = {tp_cp} > 1: this megatron-core "
            "scales the aux loss by the routed tokens of the TP/CP shard but divides by the full count, so its "
            f"gradient would be {tp_cp}x too small (NVIDIA/Megatron-LM#5047, fixed upstream). Set "
            "calculate_per_token_loss=False (the policy term is exact either way), or use TP = CP = 1 with the flag")

