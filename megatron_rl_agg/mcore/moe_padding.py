"""Padding out of an MoE model's aux-loss statistics: Megatron-Core's ``padding_mask`` for every micro-batch.

``prepare_microbatches`` gives each micro-batch a ``padding_mask [b, s]`` (bool, True = not a real token:
padding rows and columns where the batch's ``token_mask`` is 0; ``packed_forward_step`` adds the filler
of a packed sequence). Megatron-Core's ``GPTModel(..., padding_mask=...)`` (0.16.1 and 0.19.2) hands it to
every ``TopKRouter``, which then leaves those tokens out of

* the load-balancing loss ``E * sum_i f_i * P_i`` (Switch Transformer; Megatron's ``aux_loss`` /
  ``seq_aux_loss`` / ``global_aux_loss``): ``f_i = count_i / (T * k)``, ``P_i = sum_x p_i(x) / T`` and
  ``T`` count real tokens only (``T`` summed over the router's TP x CP group);
* the z-loss (ST-MoE) ``mean_x logsumexp(logits_x)^2``: the mean over real tokens (``clamp(T, 1)``);
* under ``calculate_per_token_loss`` the per-micro-batch token count ``n_k`` the router multiplies its aux
  / z loss by (the plugin's ``num_tokens`` is the same real count, summed by Megatron into ``N``).

With the flag Megatron thus weights micro-batch ``k``'s aux loss by ``n_k / N``, not by the ``1 / (M * D)``
of the flag-off schedule: the two differ as soon as micro-batches hold different real-token counts. The
aux and z coefficients of micro-batch ``k`` are multiplied by ``aux_scale = N / (M * D * n_k)`` during its
forward (``prepare_microbatches`` computes it; 1 without padding), so the aux gradient is the flag-off one
under the flag too. At TP x CP > 1 the router multiplies by each shard's real count, which no
per-micro-batch factor corrects: the flag with an aux loss and padding is refused there.

Dispatch is unchanged (a padding token still goes to some expert; its output carries no loss weight).

A micro-batch without a real token (all rows padding, e.g. a data-parallel rank padded with whole
micro-batches, or interleaved-PP rounding) would give ``T = 0``: Megatron's load-balancing loss is then
``0 * coeff / 0 = NaN``. Its tokens carry no policy loss, so its aux loss is EXCLUDED (``aux_scale`` 0:
coefficient 0, z-loss off for that forward): the aux gradient of the step is ``1 / (M * D) * sum`` over
the micro-batches that hold real tokens, flag off and on. The decision is taken from the whole
micro-batch (before the context-parallel split), so every TP / CP rank of the router's reduce group skips
the same collective. Refused, before the forward of the first micro-batch and on every rank alike:

* ``global_aux_loss`` (its statistics are reduced over data parallelism, where ranks differ) when some
  micro-batch of some data-parallel rank has no real token;
* activation recomputation (``recompute_granularity``) with such a micro-batch, or with the flag and
  padding (the recomputed forward would run with the coefficient restored);
* the flag with an aux / z loss and padding at TP x CP > 1 (above);
* ``moe_router_enable_expert_bias`` with any padding: ``TopKRouter._apply_expert_bias`` of megatron-core
  0.16.1 and 0.19.2 does ``routing_map & (~padding_mask)`` on ``[N, E]`` and ``[N]`` (a shape error, or a
  mask applied to expert columns when ``N == E``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional

import torch

__all__ = ["aux_loss_on", "masked_forward"]


def aux_loss_on(config) -> bool:
    """True when an MoE config has a load-balancing (any type) or z-loss coefficient above 0."""
    coeff = getattr(config, "moe_aux_loss_coeff", 0.0) or 0.0
    on = any(c > 0 for c in coeff) if isinstance(coeff, (list, tuple)) else coeff > 0
    return on or bool(getattr(config, "moe_z_loss_coeff", None))


def _routing_types(config) -> list:
    kind = getattr(config, "moe_router_load_balancing_type", "aux_loss")
    return list(kind) if isinstance(kind, (list, tuple)) else [kind]


def _check(config, micro_batch: Mapping[str, Any]) -> None:
    if getattr(config, "moe_router_enable_expert_bias", False) and micro_batch.get("any_padding"):
        raise ValueError(
            "moe_router_enable_expert_bias=True with padding tokens: megatron-core's "
            "TopKRouter._apply_expert_bias masks its [tokens, experts] routing map with the [tokens] padding "
            "mask without broadcasting it (a shape error, or a mask applied to expert columns), so the expert "
            "bias cannot leave padding out. Give rows without padding (equal lengths, token_mask all 1, no "
            "padding rows), or set moe_router_enable_expert_bias=False")
    if not aux_loss_on(config):
        return
    flag_padded = bool(getattr(config, "calculate_per_token_loss", False) and micro_batch.get("any_padding"))
    tp_cp = (int(getattr(config, "tensor_model_parallel_size", 1) or 1)
             * int(getattr(config, "context_parallel_size", 1) or 1))
    if flag_padded and tp_cp > 1:
        raise ValueError(
            f"calculate_per_token_loss=True with an MoE aux / z loss, padding tokens and TP x CP = {tp_cp} > 1: "
            "Megatron scales each TP / CP shard's aux loss by that shard's real tokens, which differ between "
            "shards when padding is uneven, so no per-micro-batch factor makes it exact. Set "
            "calculate_per_token_loss=False (the policy term is exact either way), or use TP = CP = 1")
    if not (micro_batch.get("empty_microbatches") or flag_padded):
        return
    if "global_aux_loss" in _routing_types(config) and micro_batch.get("empty_microbatches"):
        raise ValueError(
            "moe_router_load_balancing_type 'global_aux_loss' with a micro-batch that holds no real token on "
            "some data-parallel rank: its statistics are reduced over data parallelism, so that micro-batch "
            "cannot be left out on one rank alone. Give every data-parallel rank the same number of "
            "micro-batches of real rows, or use 'aux_loss' / 'seq_aux_loss'")
    if getattr(config, "recompute_granularity", None) is not None:
        raise ValueError(
            f"recompute_granularity={config.recompute_granularity!r} with an MoE aux loss and a micro-batch "
            "that holds no real token (or calculate_per_token_loss=True with padding): its aux loss is "
            "rescaled by its coefficient during its forward, which the recomputed forward would not see. "
            "Give every data-parallel rank the same number of micro-batches of real rows (and, with the "
            "flag, rows without padding), or set recompute_granularity=None")


@contextlib.contextmanager
def masked_forward(model, micro_batch: Mapping[str, Any],
                   padding_mask: Optional[torch.Tensor] = None) -> Iterator[dict]:
    """Yields the keyword arguments for ``model(...)`` of one micro-batch: ``{"padding_mask": [b, s] bool}``
    for an MoE model whose micro-batch carries one, else ``{}``.

    ``padding_mask`` overrides ``micro_batch["padding_mask"]`` (the packed mask with its filler). While the
    context is open the aux and z coefficients are multiplied by ``micro_batch["aux_scale"]`` (0 for a
    micro-batch with no real token; restored on exit; see the module docstring); the refusals listed
    there are raised before the model runs.
    """
    mask = micro_batch.get("padding_mask") if padding_mask is None else padding_mask
    if mask is None:
        yield {}
        return
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    if not getattr(config, "num_moe_experts", None):
        yield {}
        return
    _check(config, micro_batch)
    scale = 0.0 if micro_batch.get("no_real_token") else float(micro_batch.get("aux_scale", 1.0))
    if scale == 1.0:
        yield {"padding_mask": mask}
        return
    saved = config.moe_aux_loss_coeff, config.moe_z_loss_coeff
    aux, z = saved
    config.moe_aux_loss_coeff = [c * scale for c in aux] if isinstance(aux, (list, tuple)) else aux * scale
    # a z coefficient of 0 would log 0 / 0 in Megatron's tracker: None skips the (zero) z-loss instead
    config.moe_z_loss_coeff = None if z is None or scale == 0.0 else z * scale
    try:
        yield {"padding_mask": mask}
    finally:
        config.moe_aux_loss_coeff, config.moe_z_loss_coeff = saved
