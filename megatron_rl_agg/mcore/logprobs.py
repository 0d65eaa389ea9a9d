"""Vocab-parallel log-probs and entropy: one fused in-place pass over the logits, never gathered.

:func:`vocab_parallel_logprobs_and_entropy` (the autograd kernel :class:`_LogprobsEntropy`, formulas and
gradients in its docstring) is what :func:`megatron_rl_agg.mcore.loss.loss_func` uses;
:func:`vocab_parallel_logprobs` (Megatron's cross entropy, negated) and :func:`vocab_parallel_entropy`
serve forward-only scoring and metrics. :func:`_check_label_bounds` is the label check of
:func:`megatron_rl_agg.mcore.batch.prepare_microbatches` and :func:`megatron_rl_agg.mcore.loss.loss_func` (on
the label range read once per mini-batch); :func:`_check_label_range` the one of direct callers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron.core import tensor_parallel

from megatron_rl_agg.parallel import dist
from megatron_rl_agg.mcore import compat
from megatron_rl_agg.core.validate import positive_int

__all__ = ["vocab_parallel_logprobs_and_entropy", "vocab_parallel_logprobs", "vocab_parallel_entropy"]


# Row-chunk size of the fused log-prob / entropy kernel, in bytes of fp32 logits. On a CPU a chunk that
# stays in the L2 cache lets the five passes of a chunk (max, subtract, exp, product, copy) read main
# memory once: 512 KiB measured best (11 ms against 14 ms at 4 MiB and 34 ms unchunked for [512, 16384],
# where Megatron's cross entropy alone takes 15 ms). On a GPU the chunk only bounds the temporary and
# the number of kernel launches (not tuned on a GPU).
_CHUNK_BYTES = {"cpu": 1 << 19, "cuda": 1 << 25}
# The backward clamps log p at this floor before using it: exp(-1e4) is 0 in fp32 like exp(-inf), but
# -1e4 * 0 is 0 where -inf * 0 would be NaN (a vocabulary entry masked with -inf has p = 0).
_LOG_FLOOR = -1.0e4


def _chunk_rows(vocab_local: int, device: torch.device, chunk_rows: Optional[int]) -> int:
    if positive_int(chunk_rows, "chunk_rows", optional=True) is not None:
        return chunk_rows
    budget = _CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // (4 * max(vocab_local, 1)))


class _LogprobsEntropy(torch.autograd.Function):
    """Fused vocab-parallel ``log p(label)`` and entropy; see :func:`vocab_parallel_logprobs_and_entropy`.

    Notation per token (row ``n`` of the flattened ``[N, V/tp]`` shard): ``z`` the logits divided by the
    temperature ``T`` (``z = logits / T``; the gradient w.r.t. the raw logits is ``1 / T`` times that
    w.r.t. ``z``, applied to ``g_logp`` and ``g_H`` first), ``c_r`` this
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
    def forward(ctx, logits, labels, entropy_grad, chunk_rows, tp_group, vocab_start, temperature):
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
        scaled = temperature != 1.0
        if scaled:
            label_logit = label_logit / temperature                     # z_label / T, as chunk.div_ below

        store = ctx.needs_input_grad[0]
        keep_exp = store and not entropy_grad
        row_max = flat.new_empty(n)
        sum_e = flat.new_empty(n)
        sum_xe = flat.new_empty(n)
        temp = flat.new_empty(min(chunk_rows, n), vocab_local)
        for i in range(0, n, chunk_rows):
            chunk = flat[i:i + chunk_rows]
            if scaled:
                chunk.div_(temperature)                     # z / T, in place
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
        ctx.keep_exp, ctx.chunk_rows, ctx.shape, ctx.temperature = keep_exp, chunk_rows, logits.shape, temperature
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
            return None, None, None, None, None, None, None
        if ctx.temperature != 1.0:
            # d/dz = (1 / T) d/d(z / T), and the gradient below is linear in (g_logp, g_H)
            g_lp = None if g_lp is None else g_lp / ctx.temperature
            g_h = None if g_h is None else g_h / ctx.temperature
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
        return work.view(ctx.shape), None, None, None, None, None, None


def _label_error(value: int, vocab: int, where: str) -> ValueError:
    return ValueError(f"label id {value} is outside the vocabulary [0, {vocab}){where}; labels must be token "
                      "ids, masked positions included (use any valid id there, e.g. 0, and loss_mask 0)")


def _check_label_range(labels: torch.Tensor, vocab: int, where: str = "") -> None:
    """Raise unless every id of ``labels`` is in ``[0, vocab)`` (one device-to-host read of a flag)."""
    bad = (labels < 0) | (labels >= vocab)
    if bool(bad.any()):
        raise _label_error(int(labels[bad].flatten()[0]), vocab, where)


def _check_label_bounds(low: int, high: int, vocab: int, where: str = "") -> None:
    """Raise unless ``[low, high]`` (host ints: the smallest and largest label id) lies in ``[0, vocab)``.

    Reads nothing from the device: what :func:`megatron_rl_agg.mcore.loss.loss_func` runs per micro-batch
    with the range :func:`megatron_rl_agg.mcore.batch.prepare_microbatches` read once per mini-batch.
    """
    if low < 0:
        raise _label_error(low, vocab, where)
    if high >= vocab:
        raise _label_error(high, vocab, where)


def vocab_parallel_logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, *,
                                        entropy_grad: bool = True, chunk_rows: Optional[int] = None,
                                        check_labels: bool = True, temperature: float = 1.0
                                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(label)`` and the entropy of ``softmax(logits / T)`` from vocab-parallel logits, in one pass.

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
            labels already, as :func:`loss_func` does with the label range :func:`prepare_microbatches`
            read once per mini-batch. An unchecked out-of-range id would give a wrong log-prob.
        entropy_grad: False returns the entropy without gradient (a metric): the backward is then a
            single multiply, as cheap as Megatron's cross entropy's. True makes the entropy
            differentiable; its backward recomputes ``exp`` once per logit.
        chunk_rows: tokens per chunk (default: 512 KiB of fp32 logits on a CPU, 32 MiB on a GPU).
        temperature: ``T > 0``, the sampling temperature: the logits are divided by ``T`` in the same
            in-place pass (``z / T``, one division per logit, the operation the sampler and
            :func:`megatron_rl_agg.mcore.forward.compute_logprobs` apply), and the gradient reaching
            ``z`` carries the ``1 / T`` of the chain rule. ``T = 1`` divides nothing.

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
    group, tp_size, tp_rank = compat.parallel_group("tp")
    vocab_local = logits.shape[-1]
    vocab = vocab_local * tp_size
    if check_labels:
        _check_label_range(labels, vocab, f" (vocab shard {vocab_local} x tensor-parallel size {tp_size})")
    rows = _chunk_rows(vocab_local, logits.device, chunk_rows)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return _LogprobsEntropy.apply(logits, labels, bool(entropy_grad), rows, group, tp_rank * vocab_local,
                                  float(temperature))


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
