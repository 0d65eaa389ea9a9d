"""The Megatron-Core loss function: exact RL loss aggregation under any TP / PP / CP / DP layout.

Use (one optimizer step on one mini-batch)::

    micro_batches = prepare_microbatches(batch, loss_config, micro_batch_size,
                                         dp_group=parallel_state.get_data_parallel_group(),
                                         cp_group=parallel_state.get_context_parallel_group(),
                                         calculate_per_token_loss=config.calculate_per_token_loss)
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=model,
        num_microbatches=len(micro_batches), seq_length=S, micro_batch_size=micro_batch_size,
        forward_only=False)
    metrics = reduce_metrics(reports, parallel_state.get_data_parallel_group(with_context_parallel=True))

The gradient-scale contract (derivation; see also docs/aggregation.md)
----------------------------------------------------------------------
Notation: ``M`` micro-batches per rank, ``D`` the data-parallel size WITHOUT context parallelism, ``C``
the context-parallel size (every CP rank of a DP rank holds a zigzag shard of the same rows).

2-tuple ``(loss, report)`` (``calculate_per_token_loss=False``). Megatron's schedule
(``forward_step_calc_loss``) multiplies ``loss`` by ``C`` and divides it by ``M``; Megatron DDP
pre-scales the gradients by ``1 / (D C)`` and sums them over the dp x cp ranks. So, for parameters
``theta``, the gradient the optimizer sees is

    g = (1 / (D C)) * sum_{ranks r in dp x cp} (C / M) * sum_{micro-batches k} grad loss_{r,k}
      = (1 / (M D)) * sum_{r,k} grad loss_{r,k}                                          (1)

(the ``C`` cancels). Policy term. :func:`prepare_microbatches` computes once per mini-batch the global
per-token weights ``w`` of the chosen mode from the FULL rows (``aggregation.token_weights``: counts
summed over the DP group), then gives each CP rank its zigzag slice, so that
``sum_{r,k} sum_t w_t * pg_t`` over all dp x cp ranks IS the aggregated objective ``J``. The loss
function returns ``loss_{r,k} = M * D * sum_t w_t * pg_t``; put into (1) the ``M * D`` cancels and

    g = sum_{r,k} grad(sum_t w_t * pg_t) = grad J                                         (2)

exactly, whatever ``M``, ``D``, ``C``, the micro-batch size, TP or PP (TP ranks hold replicas of the
same loss; under PP the loss lives on the last stage and its gradient reaches the other stages through
the pipeline; under CP each rank's attention gathers the other shards' keys and values, and their
gradients flow back to them).

3-tuple ``(loss, n, report)`` (``calculate_per_token_loss=True``). The schedule leaves ``loss`` unscaled,
DDP sums the gradients over dp x cp with no pre-scale, and ``finalize_model_grads`` divides them by
``N``, the sum of the returned ``n`` over micro-batches and dp x cp ranks. With ``n`` the shard's real tokens
(padding excluded, as the masked MoE router counts them) ``N`` is known while preparing (one all-reduce), and ``loss_{r,k} = N * sum_t w_t
* pg_t`` gives ``g = (1 / N) * sum_{r,k} N * grad(...) = grad J``                        (3)

KL and entropy terms. By default (``kl_aggregation = entropy_aggregation = "microbatch_mean"``) each is
the token mean of its micro-batch: the shard sum ``sum_shard x / n_full`` with ``n_full`` the whole
micro-batch's tokens (all CP shards), NOT multiplied under the 2-tuple (and multiplied by ``N / (M D)``
under the 3-tuple, the same gradient): (1) averages it over micro-batches and DP ranks, so ``kl_coef``
and ``entropy_coef`` keep their usual meaning (a coefficient on a mean KL / entropy per token) and the
size of their gradient does not grow with ``M``, ``D`` or ``C``. The same is true of every other loss
that reaches Megatron's averaging unscaled (e.g. MoE auxiliary losses). When ``kl_aggregation`` /
``entropy_aggregation`` names a mode, that term gets global weights of the mode and the factor of the
policy term, i.e. exact global aggregation.

``token_mean_legacy`` is Megatron's own behaviour: the micro-batch token mean, scaled like a
``microbatch_mean`` term, so (1) makes it a mean of micro-batch means (which depends on how the
mini-batch is split).

Refused (:func:`check_megatron_setup`): micro-batches prepared for another ``calculate_per_token_loss``
or CP size than the model's (a 2-tuple under the flag is ``D * C`` times too large), the flag with
``average_in_collective=True``, and packed (THD) sequences under CP with the local spec.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Mapping, Optional

import torch

from megatron.core import parallel_state
from megatron.core.utils import get_model_config

from megatron_rl_agg.core.config import MICROBATCH_MEAN, LossConfig
from megatron_rl_agg.core.corrections import correction_metrics
from megatron_rl_agg.core.kl import kl_estimate
from megatron_rl_agg.core.policy_losses import SEQUENCE, get_policy_loss
from megatron_rl_agg.mcore import compat, moe_padding, routing_replay
from megatron_rl_agg.mcore.batch import LEGACY_MODE
from megatron_rl_agg.mcore.logprobs import _check_label_bounds, vocab_parallel_logprobs_and_entropy
from megatron_rl_agg.mcore.setup_checks import check_megatron_setup
from megatron_rl_agg.mcore.sequence_ratio import sequence_log_ratio

__all__ = ["loss_func", "make_loss_func", "forward_step"]


def _weighted_sum(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return (weights * values.to(weights.dtype)).sum()


def _pair(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.stack([total.detach().to(torch.float64), count.to(torch.float64)])


# LossConfig fields the weights of prepare_microbatches depend on: a loss evaluated with other values would
# apply weights computed for another objective (and silently mis-scale it).
_WEIGHT_FIELDS = ("loss_aggregation", "kl_aggregation", "entropy_aggregation", "max_response_length",
                  "policy_loss", "is_level", "is_mode", "is_low", "is_high", "is_veto", "is_denominator",
                  "is_self_normalize")


def _check_weights_match(micro_batch: Mapping[str, Any], loss_config: LossConfig) -> None:
    prepared = micro_batch.get("loss_config")
    if prepared is None or prepared is loss_config:
        return
    diff = [f"{k}={getattr(prepared, k)!r} (prepared) vs {getattr(loss_config, k)!r}" for k in _WEIGHT_FIELDS
            if getattr(prepared, k) != getattr(loss_config, k)]
    if (prepared.kl_coef > 0) != (loss_config.kl_coef > 0):
        diff.append(f"kl_coef={prepared.kl_coef!r} (prepared) vs {loss_config.kl_coef!r}")
    if diff:
        raise ValueError("the micro-batch was prepared for another loss config (its weights belong to that "
                         f"objective): {', '.join(diff)}; call prepare_microbatches with this config")


def loss_func(output_tensor: torch.Tensor, *, micro_batch: Mapping[str, Any], loss_config: LossConfig
              ) -> tuple:
    """RL loss of one micro-batch: Megatron's 2-tuple ``(loss, report)``, or under
    ``calculate_per_token_loss`` its 3-tuple ``(loss, num_tokens, report)``.

    Args:
        output_tensor: ``[b, s, V / tp]`` vocab-parallel logits of the last pipeline stage (``s = S / C``,
            this CP rank's zigzag shard).
        micro_batch: one dict from :func:`prepare_microbatches`. Its ``label_range`` (read once per
            mini-batch) is checked against the logits' vocabulary without a device read; an out-of-range
            label raises a ``ValueError`` naming it and the vocabulary. (A hand-built dict without
            ``label_range`` has its labels checked here instead, one device read.)
        loss_config: the loss settings (also the ``microbatch_mean`` vs global choice of KL / entropy).

    Returns:
        2-tuple (flag off): ``loss`` (0-d float32), scaled as derived in the module docstring:
        ``M * D * (sum w_pg * pg + kl_coef * sum w_kl * kl - entropy_coef * sum w_H * H)`` for the
        globally weighted terms, plus the unscaled shard sums ``sum_shard x / n_full`` of
        ``microbatch_mean`` terms (``n_full`` the whole micro-batch's tokens, all CP shards).
        3-tuple (flag on): the same sums with the factor ``N`` (total real tokens) in place of ``M * D``
        and ``N / (M * D)`` in place of 1, then ``num_tokens`` (int32, the shard's real tokens), then the report.
        ``report`` holds unscaled, exactly reducible metrics (see :mod:`megatron_rl_agg.core.metrics`;
        reduce them over the dp x cp group under CP, each shard holding part of every row):
        ``policy_loss/sum``, ``kl_loss/sum``, ``entropy_loss/sum`` and ``loss/sum`` (each micro-batch's
        share of the objective the gradient is of, so their totals over micro-batches and DP ranks are
        that objective's terms), and ``(sum, count)`` token means ``kl/mean``, ``entropy/mean``,
        ``clip_frac/mean``, ``dual_clip_frac/mean``, ``ppo_kl/mean`` plus ``num_tokens/sum``.
    """
    labels = micro_batch["labels"]
    mask = micro_batch["loss_mask"].to(torch.bool)
    n_tokens = mask.sum()
    scale = micro_batch["num_microbatches"] * micro_batch["dp_size"]   # M * D of equation (2)
    per_token = micro_batch.get("calculate_per_token_loss", False)
    # Factor on globally weighted terms (g) and on micro-batch means (u): 2-tuple M*D and 1 (equation (2));
    # 3-tuple N and N / (M*D) (equation (3)). The report's shares are the same in both contracts.
    g_scale = micro_batch["total_tokens"] if per_token else scale
    u_scale = micro_batch["total_tokens"] / scale if per_token else 1.0

    # The label range was read once per mini-batch by prepare_microbatches (host ints): it is compared
    # with the logits' vocabulary (shard width x TP size, from shapes), so nothing is read back here.
    tp_size = compat.parallel_group("tp")[1]
    vocab = output_tensor.shape[-1] * tp_size
    checked = micro_batch.get("vocab_size")
    if checked is not None and vocab != checked:
        raise ValueError(f"the labels were checked against vocab_size={checked} in prepare_microbatches "
                         f"but the logits cover {vocab} ids (vocab shard {output_tensor.shape[-1]} x "
                         f"tensor-parallel size {tp_size}); pass the model's padded vocabulary")
    label_range = micro_batch.get("label_range")
    if label_range is not None:
        _check_label_bounds(*label_range, vocab, f" (vocab shard {output_tensor.shape[-1]} x tensor-parallel "
                                                 f"size {tp_size})")

    # One in-place pass over the logits / T gives both (no [b, S, V/tp] temporary); T is the sampling
    # temperature, so logp is the log-prob of the distribution the rollouts were drawn from. Without an entropy bonus
    # the entropy is only the entropy/mean metric: no gradient, and the backward is a single multiply.
    logp, entropy = vocab_parallel_logprobs_and_entropy(                # [b, S] float32 each
        output_tensor, labels, entropy_grad=loss_config.entropy_coef != 0, check_labels=label_range is None,
        temperature=loss_config.temperature)

    # Masked positions are replaced by harmless constants BEFORE the nonlinear terms (ratio 1, A = 0,
    # ref = logp): a weight of 0 alone would still let an inf/NaN there poison the backward (0 * inf).
    current = logp.detach()
    old = micro_batch.get("old_logprobs")
    old = current if old is None else torch.where(mask, old.to(current.dtype), current)
    adv = micro_batch["advantages"]
    adv = torch.where(mask, (adv.unsqueeze(-1) if adv.dim() == 1 else adv).to(current.dtype), 0.0)
    # The registered policy loss (core.policy_losses); a sequence-level one gets its per-sequence mean
    # log-ratio computed exactly across CP ranks / packed segments (mcore.sequence_ratio).
    policy = get_policy_loss(loss_config.policy_loss)
    params = loss_config.policy_loss_params
    seq = None
    if policy.level == SEQUENCE:
        seq = sequence_log_ratio(policy, params, logp, old, adv, mask, micro_batch)
    pg, clipped, dual_clipped = policy(logp, old, adv, seq_log_ratio=seq, **params)
    is_w = micro_batch.get("is_weights")
    if is_w is not None:
        # Decoupled PPO (AReaL): clipped on pi/pi_prox above, weighted by the IS weight of pi_prox/pi_behave.
        pg = pg * is_w
    pg = torch.where(mask, pg, 0.0)

    legacy = loss_config.loss_aggregation == LEGACY_MODE
    pg_local = _weighted_sum(micro_batch["pg_weights"], pg)
    # Legacy: Megatron's own averaging (1) is the objective; its per-micro-batch share is pg_local / (M D).
    pg_share = pg_local / scale if legacy else pg_local
    loss = pg_local * (u_scale if legacy else g_scale)
    objective = pg_share.detach()
    report = {"policy_loss/sum": pg_share.detach()}

    terms = [("entropy", loss_config.entropy_aggregation, -loss_config.entropy_coef, entropy)]
    if loss_config.kl_coef > 0:
        ref = torch.where(mask, micro_batch["ref_logprobs"].to(current.dtype), current)
        kl = torch.where(mask, kl_estimate(logp, ref, loss_config.kl_estimator), 0.0)
        terms.append(("kl", loss_config.kl_aggregation, loss_config.kl_coef, kl))
    for name, mode, coef, values in terms:
        values = torch.where(mask, values, 0.0)
        local = _weighted_sum(micro_batch[f"{name}_weights"], values)
        global_mode = mode != MICROBATCH_MEAN
        if coef != 0:
            loss = loss + coef * local * (g_scale if global_mode else u_scale)
        share = (local if global_mode else local / scale).detach()
        report[f"{name}_loss/sum"] = share
        report[f"{name}/mean"] = _pair(values.sum(), n_tokens)
        objective = objective + coef * share

    report["loss/sum"] = objective
    # where(), not clipped[mask]: boolean indexing sizes its output on the host (a device sync)
    report["clip_frac/mean"] = _pair(torch.where(mask, clipped, 0).sum(), n_tokens)
    if loss_config.dual_clip_c is not None:
        report["dual_clip_frac/mean"] = _pair(torch.where(mask, dual_clipped, 0).sum(), n_tokens)
    elif policy.masked_metric is not None:           # e.g. DPPO: tokens outside the trust region (no gradient)
        report[f"{policy.masked_metric}/mean"] = _pair(torch.where(mask, dual_clipped, 0).sum(), n_tokens)
    report["ppo_kl/mean"] = _pair(torch.where(mask, old - current, 0.0).sum(), n_tokens)
    report["num_tokens/sum"] = n_tokens.detach().to(torch.float64)
    if is_w is not None:
        report.update(correction_metrics(is_w, micro_batch["is_log_ratio"], micro_batch["is_flags"]))
    if per_token:
        return loss.to(torch.float32), micro_batch["num_tokens"], report
    return loss.to(torch.float32), report


def make_loss_func(micro_batch: Mapping[str, Any], model: Any, loss_config: Optional[LossConfig] = None
                   ) -> functools.partial:
    """The loss function for one micro-batch, as Megatron's schedule expects it from ``forward_step``.

    Checks the setup (raises where the micro-batches were prepared for another
    ``calculate_per_token_loss`` or context-parallel size than the model's, or the flag meets
    ``average_in_collective``, see :func:`check_megatron_setup`, and for a ``dp_size`` that is not the
    model's data-parallel size, which would silently mis-scale the gradient), then binds
    :func:`loss_func` with ``functools.partial``.

    Args:
        micro_batch: one dict from :func:`prepare_microbatches`.
        model: the (DDP-wrapped) model chunk; its ``TransformerConfig`` is checked.
        loss_config: defaults to the one ``prepare_microbatches`` stored in the micro-batch.

    Returns:
        ``partial(loss_func, micro_batch=..., loss_config=...)``: call it with the model output.
    """
    cfg = micro_batch["loss_config"] if loss_config is None else loss_config
    _check_weights_match(micro_batch, cfg)
    check_megatron_setup(get_model_config(model), micro_batch, getattr(model, "ddp_config", None))
    if parallel_state.model_parallel_is_initialized():
        model_dp = parallel_state.get_data_parallel_world_size()
        if micro_batch["dp_size"] != model_dp:
            raise ValueError(
                f"micro-batches were prepared for dp_size={micro_batch['dp_size']} but the model's data-"
                f"parallel size is {model_dp}: pass dp_group=parallel_state.get_data_parallel_group() to "
                "prepare_microbatches")
    return functools.partial(loss_func, micro_batch=micro_batch, loss_config=cfg)


def forward_step(data_iterator: Iterator[Mapping[str, Any]], model: Any):
    """``forward_step_func`` for ``get_forward_backward_func()``: one micro-batch through a GPT model.

    Reads the next micro-batch of :func:`prepare_microbatches` and runs
    ``model(tokens, position_ids, attention_mask)`` (plus ``padding_mask`` for an MoE model; vocab-parallel logits on the last stage, hidden
    states elsewhere; Megatron calls the loss function only on the last stage).

    Returns:
        ``(output_tensor, make_loss_func(micro_batch, model))``.
    """
    micro_batch = next(data_iterator)
    routes = micro_batch.get("routes")
    if routes is not None:       # MoE routing replay (mcore.routing_replay): this micro-batch's routes
        routing_replay.set_replay(model, routes)
    # An MoE model gets the padding mask (mcore.moe_padding): its aux-loss statistics count real tokens
    # only, with and without replay.
    with moe_padding.masked_forward(model, micro_batch) as pad_kw:
        output = model(micro_batch["tokens"], micro_batch["position_ids"], micro_batch.get("attention_mask"),
                       **pad_kw)
    if routes is not None:
        output = routing_replay.mark_backward(model, output)
    return output, make_loss_func(micro_batch, model)
