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
``N``, the sum of the returned ``n`` over micro-batches and dp x cp ranks. With ``n = b * S / C`` (the
shard's routed tokens) ``N`` is known while preparing (one all-reduce), and ``loss_{r,k} = N * sum_t w_t
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
import math
from typing import Any, Iterator, Mapping, Optional

import torch

from megatron.core import parallel_state, tensor_parallel
from megatron.core.utils import get_model_config

from megatron_rl_agg.parallel import dist
from megatron_rl_agg.core.aggregation import check_loss_mask, microbatch_mean_weights
from megatron_rl_agg.parallel.weights import token_weights
from megatron_rl_agg.core.config import MICROBATCH_MEAN, LossConfig
from megatron_rl_agg.core.context_parallel import check_cp_seq_length, split_for_cp_rank
from megatron_rl_agg.core.kl import kl_estimate
from megatron_rl_agg.core.policy_losses import ppo_clipped_surrogate
from megatron_rl_agg.core.rows import pad_rows_to

__all__ = [
    "LEGACY_MODE",
    "check_megatron_setup",
    "check_moe_setup",
    "vocab_parallel_logprobs_and_entropy",
    "vocab_parallel_logprobs",
    "vocab_parallel_entropy",
    "prepare_microbatches",
    "loss_func",
    "make_loss_func",
    "forward_step",
]

LEGACY_MODE = "token_mean_legacy"

# Per-row tensors of a mini-batch that are sliced into micro-batches (None-valued keys are kept None).
_ROW_KEYS = ("tokens", "position_ids", "labels", "loss_mask", "advantages", "old_logprobs",
             "ref_logprobs", "attention_mask")
# Per-token ([b, S]) tensors of a micro-batch that context parallelism splits along the sequence.
_TOKEN_KEYS = ("tokens", "position_ids", "labels", "loss_mask", "advantages", "old_logprobs",
               "ref_logprobs", "pg_weights", "kl_weights", "entropy_weights")


# ----------------------------------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------------------------------

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


def _router_scales_aux_by_tp_cp() -> bool:
    """Whether this megatron-core's router multiplies the per-token aux-loss scale by the TP x CP size
    (the fix of NVIDIA/Megatron-LM#5047), read from the router's source."""
    import inspect

    from megatron.core.transformer.moe.router import TopKRouter

    return "tp_cp_group.size()" in inspect.getsource(TopKRouter.attach_and_log_load_balancing_loss)


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


# ----------------------------------------------------------------------------------------------
# vocab-parallel log-probs and entropy (never gather the full logits)
# ----------------------------------------------------------------------------------------------

# Row-chunk size of the fused log-prob / entropy kernel, in bytes of fp32 logits. On a CPU a chunk that
# stays in the L2 cache lets the five passes of a chunk (max, subtract, exp, product, copy) read main
# memory once: 512 KiB measured best (11 ms against 14 ms at 4 MiB and 34 ms unchunked for [512, 16384],
# where Megatron's cross entropy alone takes 15 ms). On a GPU the chunk only bounds the temporary and
# the number of kernel launches (not tuned on a GPU).
_CHUNK_BYTES = {"cpu": 1 << 19, "cuda": 1 << 25}
# The backward clamps log p at this floor before using it: exp(-1e4) is 0 in fp32 like exp(-inf), but
# -1e4 * 0 is 0 where -inf * 0 would be NaN (a vocabulary entry masked with -inf has p = 0).
_LOG_FLOOR = -1.0e4


def _tp_layout() -> tuple[Any, int, int]:
    """``(group, rank, size)`` of the tensor-parallel group; ``(None, 0, 1)`` without parallel_state."""
    if not parallel_state.model_parallel_is_initialized():
        return None, 0, 1
    return (parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def _chunk_rows(vocab_local: int, device: torch.device, chunk_rows: Optional[int]) -> int:
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
        return chunk_rows
    budget = _CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // (4 * max(vocab_local, 1)))


class _LogprobsEntropy(torch.autograd.Function):
    """Fused vocab-parallel ``log p(label)`` and entropy; see :func:`vocab_parallel_logprobs_and_entropy`.

    Notation per token (row ``n`` of the flattened ``[N, V/tp]`` shard): ``z`` the logits, ``c_r`` this
    rank's row max, ``c`` the global row max, ``x = z - c_r`` (this rank's centered logits),
    ``e = exp(x)``, ``S = sum_v exp(z_v - c)`` and ``T = sum_v exp(z_v - c) (z_v - c)`` over the full
    vocabulary. Then ``log p_v = z_v - c - log S = x_v - k`` with ``k = log S - (c_r - c)``, and

        logp = (z_label - c) - log S,        H = -sum_v p_v log p_v = log S - T / S.

    Each rank sums over its shard relative to its own max (one sweep, each chunk read from memory once)
    and rescales to the global max afterwards: ``exp(z - c) = e * exp(c_r - c)``, so
    ``S = sum_r exp(c_r - c) S_r`` and ``T = sum_r exp(c_r - c) (T_r + (c_r - c) S_r)``.
    Collectives over the TP group: one all-reduce(max) of ``c_r`` and one all-reduce(sum) of the stacked
    ``[z_label - c (label owner, else 0), S_r', T_r']``.

    Gradients: ``d logp / dz_v = 1[v = label] - p_v`` and ``d H / dz_v = -p_v (log p_v + H)``, so

        dL/dz_v = g_logp 1[v = label] - p_v (g_logp + g_H (log p_v + H)).

    Buffer kept for the backward (the fp32 logits tensor itself, overwritten in place, as Megatron's
    cross entropy does): ``e`` when the entropy has no gradient (the backward is one multiply by
    ``-g_logp exp(-k)``, ``p = e exp(-k)``), else ``x`` (the backward recomputes ``p = exp(x - k)`` and
    ``log p = x - k`` chunk by chunk). Each rank returns the gradient of its own shard; the label term is
    added on the rank owning the label only.
    """

    @staticmethod
    def forward(ctx, logits, labels, entropy_grad, chunk_rows, tp_group, vocab_start):
        work = logits.float()           # the input itself when fp32 (rewritten in place), else a copy
        if not work.is_contiguous():
            work = work.contiguous()
        vocab_local = work.shape[-1]
        flat = work.view(-1, vocab_local)
        n = flat.shape[0]
        local = labels.reshape(-1).long() - vocab_start
        owned = (local >= 0) & (local < vocab_local)
        local = torch.where(owned, local, 0)
        label_logit = flat.gather(1, local.unsqueeze(1)).squeeze(1)      # raw z_label (owner rows)

        store = ctx.needs_input_grad[0]
        keep_exp = store and not entropy_grad
        row_max = flat.new_empty(n)
        sum_e = flat.new_empty(n)
        sum_xe = flat.new_empty(n)
        temp = flat.new_empty(min(chunk_rows, n), vocab_local)
        for i in range(0, n, chunk_rows):
            chunk = flat[i:i + chunk_rows]
            rows = chunk.shape[0]
            e = temp[:rows]
            c = chunk.amax(dim=1, keepdim=True)
            row_max[i:i + rows] = c.squeeze(1)
            chunk.sub_(c)                                   # x
            torch.exp(chunk, out=e)
            sum_e[i:i + rows] = e.sum(dim=1)
            # nansum: a -inf logit has e = 0 and x * e = NaN, where its true term is 0 (a NaN logit
            # still shows: it makes the row max, S and every output NaN).
            if keep_exp:
                chunk.mul_(e)                               # x * e, then the buffer keeps e
                sum_xe[i:i + rows] = chunk.nansum(dim=1)
                chunk.copy_(e)
            else:
                e.mul_(chunk)                               # the buffer keeps x
                sum_xe[i:i + rows] = e.nansum(dim=1)
        del temp

        c_global = dist.all_reduce_max(row_max, tp_group)
        shift = row_max - c_global                          # c_r - c <= 0; exactly 0 at TP1
        scale = shift.exp()
        label_term = torch.where(owned, label_logit - c_global, 0.0)
        stacked = torch.stack([label_term, sum_e * scale, (sum_xe + shift * sum_e) * scale])
        label_term, total, weighted = dist.all_reduce_sum(stacked, tp_group).unbind(0)
        log_total = total.log()
        logp = label_term - log_total
        entropy = log_total - weighted / total

        ctx.set_materialize_grads(False)
        ctx.keep_exp, ctx.chunk_rows, ctx.shape = keep_exp, chunk_rows, logits.shape
        if store:
            ctx.save_for_backward(work, log_total - shift, entropy, local, owned)
        logp, entropy_out = logp.view(labels.shape), entropy.view(labels.shape)
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy_out)
        return logp, entropy_out

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        work, k, entropy, local, owned = ctx.saved_tensors
        flat = work.view(-1, work.shape[-1])
        g_lp = None if grad_logp is None else grad_logp.reshape(-1).float()
        g_h = None if (grad_entropy is None or ctx.keep_exp) else grad_entropy.reshape(-1).float()
        if g_lp is None and g_h is None:
            return None, None, None, None, None, None
        if ctx.keep_exp:
            # p = e exp(-k): dL/dz = -g_logp p (+ g_logp at the label, below). One pass, in place.
            flat.mul_((-g_lp * torch.exp(-k)).unsqueeze(1))
        else:
            zeros = k.new_zeros(k.shape)
            g_lp_or_0 = zeros if g_lp is None else g_lp
            g_h_or_0 = zeros if g_h is None else g_h
            # dL/dz = -p (g_logp + g_H H + g_H log p): per row, a + b * log p with a, b below.
            a = -(g_lp_or_0 + g_h_or_0 * entropy)
            b = -g_h_or_0
            step = ctx.chunk_rows
            temp = flat.new_empty(min(step, flat.shape[0]), flat.shape[1])
            for i in range(0, flat.shape[0], step):
                chunk = flat[i:i + step]
                rows = chunk.shape[0]
                p = temp[:rows]
                chunk.sub_(k[i:i + rows].unsqueeze(1)).clamp_(min=_LOG_FLOOR)   # log p
                torch.exp(chunk, out=p)
                chunk.mul_(b[i:i + rows].unsqueeze(1)).add_(a[i:i + rows].unsqueeze(1)).mul_(p)
            del temp
        if g_lp is not None:
            rows = torch.arange(flat.shape[0], device=flat.device)
            flat.index_put_((rows, local), torch.where(owned, g_lp, 0.0), accumulate=True)
        return work.view(ctx.shape), None, None, None, None, None


def _check_label_range(labels: torch.Tensor, vocab: int, where: str = "") -> None:
    """Raise unless every id of ``labels`` is in ``[0, vocab)`` (one device-to-host read of a flag)."""
    bad = (labels < 0) | (labels >= vocab)
    if bool(bad.any()):
        value = int(labels[bad].flatten()[0])
        raise ValueError(f"label id {value} is outside the vocabulary [0, {vocab}){where}; labels must be "
                         "token ids, masked positions included (use any valid id there, e.g. 0, and "
                         "loss_mask 0)")


def vocab_parallel_logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, *,
                                        entropy_grad: bool = True, chunk_rows: Optional[int] = None,
                                        check_labels: bool = True
                                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(label)`` and the entropy of ``softmax(logits)`` from vocab-parallel logits, in one pass.

    What :func:`loss_func` uses. It allocates no ``[b, s, V / tp]`` tensor for fp32 logits: like
    Megatron's ``vocab_parallel_cross_entropy`` it works in the logits tensor IN PLACE and keeps it
    for the backward (bf16 / fp16 logits are first copied to fp32 once, as Megatron does), and its only
    other temporary is one chunk of rows. Two collectives over the TP group (an all-reduce(max) and an
    all-reduce(sum)); none in the backward. Formulas and the gradient: :class:`_LogprobsEntropy`.

    Args:
        logits: ``[b, s, V / tp]`` (any leading shape) this TP rank's vocab shard, fp32, bf16 or fp16.
            fp32 logits are rewritten in place (pass a clone if they are needed afterwards); others are
            copied to fp32 first and left unchanged.
        labels: ``logits.shape[:-1]`` integer global vocab ids in ``[0, V)`` (a bad id raises; checking
            it reads one flag back from the device).
        check_labels: False skips that check (no device-to-host read): for callers that validated the
            labels already, as :func:`loss_func` does when :func:`prepare_microbatches` checked the whole
            mini-batch against ``vocab_size``. An unchecked out-of-range id would give a wrong log-prob.
        entropy_grad: False returns the entropy without gradient (a metric): the backward is then a
            single multiply, as cheap as Megatron's cross entropy's. True makes the entropy
            differentiable; its backward recomputes ``exp`` once per logit.
        chunk_rows: tokens per chunk (default: 512 KiB of fp32 logits on a CPU, 32 MiB on a GPU).

    Returns:
        ``(logp, entropy)``, each ``labels.shape`` float32 and identical on every TP rank; gradients
        reach only this rank's shard, each shard getting exactly its slice of the full gradient.
    """
    if logits.dim() < 1 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels must have the logits' shape without the vocab dim: logits "
                         f"{tuple(logits.shape)}, labels {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise ValueError(f"labels must be an integer tensor of vocab ids, got dtype {labels.dtype}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point (fp32, bf16, fp16), got dtype {logits.dtype}")
    group, tp_rank, tp_size = _tp_layout()
    vocab_local = logits.shape[-1]
    vocab = vocab_local * tp_size
    if check_labels:
        _check_label_range(labels, vocab, f" (vocab shard {vocab_local} x tensor-parallel size {tp_size})")
    rows = _chunk_rows(vocab_local, logits.device, chunk_rows)
    return _LogprobsEntropy.apply(logits, labels, bool(entropy_grad), rows, group, tp_rank * vocab_local)


def vocab_parallel_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p(label)`` from vocab-parallel logits (Megatron's cross entropy, negated).

    For log-probs alone (e.g. forward-only scoring); :func:`loss_func` uses
    :func:`vocab_parallel_logprobs_and_entropy`, which also gives the entropy in the same pass.

    Args:
        logits: ``[b, s, V / tp]``, this TP rank's vocab shard (Megatron's ``parallel_output`` layout).
            NOTE: Megatron's vocab-parallel cross entropy normalizes the tensor IN PLACE; pass a clone if
            the logits are needed afterwards.
        labels: ``[b, s]`` int64 global vocab ids.

    Returns:
        ``[b, s]`` float32 log-probs (``-vocab_parallel_cross_entropy``), identical on every TP rank,
        differentiable w.r.t. this rank's shard.
    """
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the TP-split vocabulary, leaving ``logits`` unchanged.

    The fused kernel of :func:`vocab_parallel_logprobs_and_entropy` (``H = log S - T / S``, see
    :class:`_LogprobsEntropy`) run on an fp32 copy of ``logits``, which it keeps for the backward
    (one ``[b, s, V / tp]`` fp32 buffer); differentiable. :func:`loss_func` does not use it: it gets the
    entropy from the same pass as the log-probs, in place.

    Args:
        logits: ``[b, s, V / tp]`` this rank's shard.

    Returns:
        ``[b, s]`` float32 entropies, identical on every TP rank.
    """
    work = logits.float()
    if work is logits:
        work = logits.clone()
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return vocab_parallel_logprobs_and_entropy(work, labels, entropy_grad=True)[1]


# ----------------------------------------------------------------------------------------------
# mini-batch -> micro-batches (all global quantities computed here, once)
# ----------------------------------------------------------------------------------------------

def _check_batch(batch: Mapping[str, Optional[torch.Tensor]], loss_config: LossConfig) -> tuple[int, int]:
    for key in ("tokens", "labels", "loss_mask", "advantages"):
        if batch.get(key) is None:
            raise ValueError(f"batch is missing {key!r}; required: tokens, labels, loss_mask, advantages")
    n_rows, seq = batch["tokens"].shape
    for key in ("position_ids", "labels", "loss_mask", "old_logprobs", "ref_logprobs"):
        t = batch.get(key)
        if t is not None and tuple(t.shape) != (n_rows, seq):
            raise ValueError(f"batch[{key!r}] must be [B, S] = [{n_rows}, {seq}], got {tuple(t.shape)}")
    adv = batch["advantages"]
    if tuple(adv.shape) not in ((n_rows,), (n_rows, seq)):
        raise ValueError(f"batch['advantages'] must be [B] or [B, S] with B={n_rows}, S={seq}; "
                         f"got {tuple(adv.shape)}")
    if loss_config.kl_coef > 0 and batch.get("ref_logprobs") is None:
        raise ValueError(f"kl_coef={loss_config.kl_coef} needs batch['ref_logprobs'] ([B, S] log-probs of "
                         "the labels under the reference policy); set kl_coef=0 to train without KL")
    if loss_config.needs_groups and batch.get("group_ids") is None:
        raise ValueError("prompt_mean aggregation needs batch['group_ids'] ([B] int64 prompt-group ids, the "
                         "same id on every DP rank for rows of one prompt)")
    return n_rows, seq


def _mask_problem(mask: torch.Tensor) -> Optional[str]:
    """Why ``mask`` is not a 0/1 mask (this rank's message), or None; raised on every DP rank together."""
    try:
        check_loss_mask(mask)
    except ValueError as err:
        return str(err)
    return None


def prepare_microbatches(batch: Mapping[str, Optional[torch.Tensor]], loss_config: LossConfig,
                         micro_batch_size: int, dp_group=None, *, cp_group=None,
                         calculate_per_token_loss: bool = False, vocab_size: Optional[int] = None
                         ) -> list[dict]:
    """Split this DP rank's share of one mini-batch into micro-batches carrying exact global weights.

    Call once per optimizer step, on every DP rank (it issues collectives over ``dp_group``: one
    all-reduce(max) of the micro-batch count plus the ``token_weights`` counts of each distinct mode in
    use, plus one all-reduce(sum) of the routed-token total under ``calculate_per_token_loss``; none per
    micro-batch and none over the CP group).

    Context parallelism: every CP rank of a DP rank passes the SAME full rows. All weights are computed
    from the full rows (counts over ``dp_group`` only: the CP ranks of one DP rank hold the same rows, a
    count over dp x cp would count each row C times), then every per-token tensor is cut to this CP rank's
    zigzag shard (:func:`megatron_rl_agg.core.context_parallel.split_for_cp_rank`), as Megatron's
    ``get_batch_on_this_cp_rank`` cuts the model inputs.

    Args:
        batch: this rank's rows:
            ``tokens [B, S]`` int64 inputs; ``position_ids [B, S]`` (default ``arange(S)``);
            ``labels [B, S]`` next-token targets; ``loss_mask [B, S]`` 0/1 aligned with ``labels``;
            ``advantages [B]`` or ``[B, S]``; ``old_logprobs [B, S]`` behaviour log-probs of ``labels``
            (optional: None means on-policy, ratio 1 with the detached current log-probs);
            ``ref_logprobs [B, S]`` (required when ``kl_coef > 0``); ``group_ids [B]`` int64 global
            prompt-group ids (required by ``prompt_mean``); ``attention_mask`` (optional, passed to the
            model; sliced by rows when its first dim is ``B``, padding rows copying the last row's mask).
        loss_config: the loss settings.
        micro_batch_size: rows per micro-batch.
        dp_group: the data-parallel group WITHOUT context parallelism
            (``parallel_state.get_data_parallel_group()``) whose ranks together hold the mini-batch
            (None: single process).
        cp_group: the context-parallel group (``parallel_state.get_context_parallel_group()``; None: no
            CP). ``S`` must be a multiple of ``2 * C``; a per-row ``attention_mask`` is refused under CP
            (the CP attention builds its causal mask from global positions).
        calculate_per_token_loss: the model's ``TransformerConfig.calculate_per_token_loss``; True makes
            :func:`loss_func` return Megatron's 3-tuple (see its docstring).
        vocab_size: the model's (padded) vocabulary size ``V``. When given, every label of the mini-batch
            is checked against ``[0, V)`` here, once (one device-to-host read), and :func:`loss_func`
            then reads nothing back from the device (it only compares ``V`` with the logits' shape).
            None: the check runs in :func:`loss_func`, one read per micro-batch.

    Returns:
        ``M`` dicts (``M`` equal on every DP rank: the largest ``ceil(B / micro_batch_size)``; rows are
        padded with fully masked rows, which change nothing). Each holds the sliced row tensors (``[b, S / C]``
        per-token tensors under CP) plus ``pg_weights``, ``kl_weights``, ``entropy_weights`` (float64),
        ``num_microbatches`` (``M``), ``dp_size``, ``cp_size``, ``calculate_per_token_loss``, under the flag
        ``num_tokens`` (int32, ``b * S / C``) and ``total_tokens`` (``N``, float64, the sum of
        ``num_tokens`` over every micro-batch and dp x cp rank), ``loss_config`` and ``vocab_size`` (None when
        unchecked). Pass
        ``num_microbatches=M`` and ``seq_length=S`` (the FULL length) to Megatron's schedule.
    """
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
    n_rows, seq = _check_batch(batch, loss_config)
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
        _check_label_range(batch["labels"], vocab_size)
    dp_size = dist.world_size(dp_group)
    cp_size, cp_rank = dist.world_size(cp_group), dist.rank(cp_group)
    if cp_size > 1:
        check_cp_seq_length(seq, cp_size)
        if batch.get("attention_mask") is not None:
            raise ValueError(
                f"an attention_mask cannot be split for context parallelism (context_parallel_size="
                f"{cp_size}): the CP attention builds the causal mask from global zigzag positions; pass "
                "attention_mask=None")
    device = batch["tokens"].device

    # M must be the same on every DP rank (Megatron runs one schedule of M micro-batches everywhere).
    # The 0/1 check of the mask rides on the same all-reduce, so a bad mask on one rank raises on all.
    problem = _mask_problem(batch["loss_mask"])
    n_local = torch.tensor([math.ceil(n_rows / micro_batch_size), problem is not None], dtype=torch.int64,
                           device=device)
    num_mb, any_bad = dist.all_reduce_max(n_local, dp_group).tolist()
    if any_bad:
        raise ValueError(problem or "loss_mask of another data-parallel rank holds values other than 0 and 1 "
                                    "(that rank's error names them)")
    padded = num_mb * micro_batch_size

    # Global weights from the REAL rows only: padded rows have no loss token and are appended after,
    # with zero weight, so they touch no count and need no group id.
    mask = batch["loss_mask"]
    cache: dict[str, torch.Tensor] = {}

    def weights_for(mode: str) -> Optional[torch.Tensor]:
        if mode in (MICROBATCH_MEAN, LEGACY_MODE):
            return None  # per micro-batch, below
        if mode not in cache:
            w = token_weights(mask, mode, group_ids=batch.get("group_ids"),
                              max_response_length=loss_config.max_response_length,
                              process_group=dp_group, dtype=torch.float64)
            cache[mode] = pad_rows_to(w, padded)
        return cache[mode]

    global_w = {"pg_weights": weights_for(loss_config.loss_aggregation),
                "kl_weights": weights_for(loss_config.kl_aggregation) if loss_config.kl_coef > 0 else None,
                "entropy_weights": weights_for(loss_config.entropy_aggregation)}

    rows = {k: batch.get(k) for k in _ROW_KEYS}
    if rows["position_ids"] is None:
        rows["position_ids"] = torch.arange(seq, device=device).unsqueeze(0).expand(n_rows, seq)
    attn = rows.pop("attention_mask")
    rows = {k: pad_rows_to(v, padded) for k, v in rows.items()}
    if attn is not None and attn.shape[0] == n_rows and padded > n_rows:
        if n_rows == 0:
            raise ValueError("a per-row attention_mask cannot be padded on a rank with no rows; pass a mask "
                             "shared by all rows (first dim 1) or give every DP rank at least one row")
        # Padding rows copy a real row's mask: an all-masked attention row would give NaN logits there,
        # and NaN times a zero weight is still NaN in the backward pass.
        attn = torch.cat([attn, attn[-1:].expand((padded - n_rows,) + tuple(attn.shape[1:]))], dim=0)

    extra: dict[str, Any] = {}
    if calculate_per_token_loss:
        # Megatron sums the returned num_tokens over micro-batches and dp x cp ranks (finalize_model_grads)
        # and divides the gradient by that total N. num_tokens is the shard's ROUTED token count b * S / C
        # (padding included: the scale an MoE aux loss is built for). The C CP ranks of a DP rank hold
        # equal shards, so N = sum over DP ranks of M * b * S: one all-reduce over the DP group.
        local_routed = torch.tensor([float(num_mb * micro_batch_size * seq)], dtype=torch.float64,
                                    device=device)
        extra = {"num_tokens": torch.tensor(micro_batch_size * (seq // cp_size), dtype=torch.int32,
                                            device=device),
                 "total_tokens": dist.all_reduce_sum(local_routed, dp_group)[0]}

    micro_batches = []
    for k in range(num_mb):
        sl = slice(k * micro_batch_size, (k + 1) * micro_batch_size)
        mb = {key: (v[sl] if v is not None else None) for key, v in rows.items()}
        mb["attention_mask"] = attn[sl] if attn is not None and attn.shape[0] == padded else attn
        # The micro-batch mean divides by the WHOLE micro-batch's tokens (all CP shards): full rows here.
        local_mean = microbatch_mean_weights(mb["loss_mask"], dtype=torch.float64)
        for key, w in global_w.items():
            mb[key] = w[sl] if w is not None else local_mean
        if cp_size > 1:
            for key in _TOKEN_KEYS:
                if mb[key] is not None and mb[key].dim() == 2:      # [b, S] (advantages may be [b])
                    mb[key] = split_for_cp_rank(mb[key], cp_size, cp_rank, dim=1)
        mb.update(num_microbatches=num_mb, dp_size=dp_size, cp_size=cp_size,
                  calculate_per_token_loss=bool(calculate_per_token_loss), loss_config=loss_config,
                  vocab_size=vocab_size, **extra)
        micro_batches.append(mb)
    return micro_batches


# ----------------------------------------------------------------------------------------------
# the loss function Megatron calls on the last pipeline stage
# ----------------------------------------------------------------------------------------------

def _weighted_sum(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return (weights * values.to(weights.dtype)).sum()


def _pair(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.stack([total.detach().to(torch.float64), count.to(torch.float64)])


# LossConfig fields the weights of prepare_microbatches depend on: a loss evaluated with other values would
# apply weights computed for another objective (and silently mis-scale it).
_WEIGHT_FIELDS = ("loss_aggregation", "kl_aggregation", "entropy_aggregation", "max_response_length")


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
        micro_batch: one dict from :func:`prepare_microbatches`.
        loss_config: the loss settings (also the ``microbatch_mean`` vs global choice of KL / entropy).

    Returns:
        2-tuple (flag off): ``loss`` (0-d float32), scaled as derived in the module docstring:
        ``M * D * (sum w_pg * pg + kl_coef * sum w_kl * kl - entropy_coef * sum w_H * H)`` for the
        globally weighted terms, plus the unscaled shard sums ``sum_shard x / n_full`` of
        ``microbatch_mean`` terms (``n_full`` the whole micro-batch's tokens, all CP shards).
        3-tuple (flag on): the same sums with the factor ``N`` (total routed tokens) in place of ``M * D``
        and ``N / (M * D)`` in place of 1, then ``num_tokens = b * s`` (int32), then the report.
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

    # Labels checked once per mini-batch by prepare_microbatches (vocab_size given): only the vocabulary
    # is compared here, from shapes, so nothing is read back from the device in this function.
    checked = micro_batch.get("vocab_size")
    if checked is not None:
        vocab = output_tensor.shape[-1] * _tp_layout()[2]
        if vocab != checked:
            raise ValueError(f"the labels were checked against vocab_size={checked} in prepare_microbatches "
                             f"but the logits cover {vocab} ids (vocab shard {output_tensor.shape[-1]} x "
                             f"tensor-parallel size {_tp_layout()[2]}); pass the model's padded vocabulary")

    # One in-place pass over the logits gives both (no [b, S, V/tp] temporary). Without an entropy bonus
    # the entropy is only the entropy/mean metric: no gradient, and the backward is a single multiply.
    logp, entropy = vocab_parallel_logprobs_and_entropy(                # [b, S] float32 each
        output_tensor, labels, entropy_grad=loss_config.entropy_coef != 0, check_labels=checked is None)

    # Masked positions are replaced by harmless constants BEFORE the nonlinear terms (ratio 1, A = 0,
    # ref = logp): a weight of 0 alone would still let an inf/NaN there poison the backward (0 * inf).
    current = logp.detach()
    old = micro_batch.get("old_logprobs")
    old = current if old is None else torch.where(mask, old.to(current.dtype), current)
    adv = micro_batch["advantages"]
    adv = torch.where(mask, (adv.unsqueeze(-1) if adv.dim() == 1 else adv).to(current.dtype), 0.0)
    pg, clipped, dual_clipped = ppo_clipped_surrogate(
        logp, old, adv, clip_eps_low=loss_config.clip_eps_low, clip_eps_high=loss_config.clip_eps_high,
        dual_clip_c=loss_config.dual_clip_c)
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
    report["ppo_kl/mean"] = _pair(torch.where(mask, old - current, 0.0).sum(), n_tokens)
    report["num_tokens/sum"] = n_tokens.detach().to(torch.float64)
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
    ``model(tokens, position_ids, attention_mask)`` (vocab-parallel logits on the last stage, hidden
    states elsewhere; Megatron calls the loss function only on the last stage).

    Returns:
        ``(output_tensor, make_loss_func(micro_batch, model))``.
    """
    micro_batch = next(data_iterator)
    output = model(micro_batch["tokens"], micro_batch["position_ids"], micro_batch.get("attention_mask"))
    return output, make_loss_func(micro_batch, model)
