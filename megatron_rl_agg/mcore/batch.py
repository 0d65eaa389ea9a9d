"""Mini-batch -> micro-batches: every global quantity of the loss computed here, once per optimizer step.

:func:`prepare_microbatches` checks the rows, computes the global per-token weights of each aggregation
mode in use (counts summed over the data-parallel group), slices the rows into micro-batches (padding
with fully masked rows so every DP rank runs the same number), cuts each to this context-parallel
rank's zigzag shard and records what :func:`megatron_rl_agg.mcore.loss.loss_func` needs to scale the
loss (see the gradient-scale contract in :mod:`megatron_rl_agg.mcore.loss`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch

from megatron_rl_agg.core.aggregation import check_loss_mask, microbatch_mean_weights
from megatron_rl_agg.parallel.weights import token_weights
from megatron_rl_agg.core.config import MICROBATCH_MEAN, LossConfig
from megatron_rl_agg.core.context_parallel import check_cp_seq_length, split_for_cp_rank
from megatron_rl_agg.core.policy_losses import SEQUENCE, get_policy_loss
from megatron_rl_agg.mcore.logprobs import _check_label_bounds
from megatron_rl_agg.mcore.routing_replay import padding_routes
from megatron_rl_agg.parallel.corrections import mini_batch_importance_weights
from megatron_rl_agg.parallel import dist
from megatron_rl_agg.core.rows import pad_rows_to
from megatron_rl_agg.core.validate import positive_int

__all__ = ["LEGACY_MODE", "prepare_microbatches"]

LEGACY_MODE = "token_mean_legacy"

# Per-row tensors of a mini-batch that are sliced into micro-batches (None-valued keys are kept None).
_ROW_KEYS = ("tokens", "position_ids", "labels", "loss_mask", "advantages", "old_logprobs",
             "ref_logprobs", "attention_mask")
# Off-policy correction tensors ([B, S], present only with batch['behaviour_logprobs']): the IS weight, the
# token log-ratio logp_prox - logp_behave and the int8 flags of core.corrections (for the metrics).
_IS_KEYS = ("is_weights", "is_log_ratio", "is_flags")
# Per-token ([b, S]) tensors of a micro-batch that context parallelism splits along the sequence.
_TOKEN_KEYS = ("tokens", "position_ids", "labels", "loss_mask", "advantages", "old_logprobs",
               "ref_logprobs", "pg_weights", "kl_weights", "entropy_weights", "routes", "padding_mask") + _IS_KEYS


def _check_batch(batch: Mapping[str, Optional[torch.Tensor]], loss_config: LossConfig) -> tuple[int, int]:
    for key in ("tokens", "labels", "loss_mask", "advantages"):
        if batch.get(key) is None:
            raise ValueError(f"batch is missing {key!r}; required: tokens, labels, loss_mask, advantages")
    n_rows, seq = batch["tokens"].shape
    for key in ("position_ids", "labels", "loss_mask", "old_logprobs", "ref_logprobs", "behaviour_logprobs",
                "token_mask"):
        t = batch.get(key)
        if t is not None and tuple(t.shape) != (n_rows, seq):
            raise ValueError(f"batch[{key!r}] must be [B, S] = [{n_rows}, {seq}], got {tuple(t.shape)}")
    routes = batch.get("routes")
    if routes is not None and (routes.dim() != 4 or tuple(routes.shape[:2]) != (n_rows, seq)):
        raise ValueError(f"batch['routes'] must be [B, S, moe_layers, topk] with B={n_rows}, S={seq}; got "
                         f"{tuple(routes.shape)}")
    adv = batch["advantages"]
    if tuple(adv.shape) not in ((n_rows,), (n_rows, seq)):
        raise ValueError(f"batch['advantages'] must be [B] or [B, S] with B={n_rows}, S={seq}; "
                         f"got {tuple(adv.shape)}")
    if loss_config.kl_coef > 0 and batch.get("ref_logprobs") is None:
        raise ValueError(f"kl_coef={loss_config.kl_coef} needs batch['ref_logprobs'] ([B, S] log-probs of "
                         "the labels under the reference policy); set kl_coef=0 to train without KL")
    if loss_config.is_level != "off" and batch.get("behaviour_logprobs") is None:
        raise ValueError(f"is_level={loss_config.is_level!r} needs batch['behaviour_logprobs'] ([B, S] log-probs "
                         "of the labels under the policy that sampled them); set is_level='off' to train without "
                         "the off-policy correction")
    if batch.get("behaviour_logprobs") is not None and batch.get("old_logprobs") is None:
        raise ValueError("batch['behaviour_logprobs'] needs batch['old_logprobs'] (the proximal log-probs the "
                         "importance weight pi_prox / pi_behave is taken against)")
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


# The log-prob inputs checked once per mini-batch (finite and <= 0 on real tokens), and how errors name them.
_LOGPROB_KEYS = {"old_logprobs": "old (proximal) log-probs", "ref_logprobs": "reference log-probs",
                 "behaviour_logprobs": "behaviour log-probs"}


def _logprob_flags(batch: Mapping[str, Optional[torch.Tensor]], loss_config: LossConfig,
                   device) -> torch.Tensor:
    """``[3]`` int64 on the device, one per key of :data:`_LOGPROB_KEYS`: 1 where the old / proximal
    (``old_logprobs``), reference (``ref_logprobs``, when ``kl_coef > 0``) or behaviour
    (``behaviour_logprobs``) log-probs hold a value that is not finite or is above 0 on a real token
    (``loss_mask != 0``); no read from the device here (the flags ride on the one all-reduce below)."""
    real = batch["loss_mask"] != 0
    flags = []
    for key, used in zip(_LOGPROB_KEYS, (True, loss_config.kl_coef > 0, True)):
        lp = batch.get(key)
        if lp is None or not used:
            flags.append(torch.zeros((), dtype=torch.int64, device=device))
            continue
        flags.append((real & ~(torch.isfinite(lp) & (lp <= 0))).any().to(device=device, dtype=torch.int64))
    return torch.stack(flags)


def _logprob_problem(batch: Mapping[str, Optional[torch.Tensor]], key: str) -> str:
    """The message naming the first bad row of ``batch[key]`` on this rank, or another rank's (error path
    only: reads from the device)."""
    lp = batch.get(key)
    what = f"{_LOGPROB_KEYS[key]} ({key})"
    bad = None if lp is None else (batch["loss_mask"] != 0) & ~(torch.isfinite(lp) & (lp <= 0))
    if bad is None or not bool(bad.any()):
        return (f"{what} of another data-parallel rank hold a non-finite or positive value on a real token "
                "(that rank's error names the row)")
    row, col = (int(i) for i in torch.nonzero(bad)[0])
    return (f"{what} of row {row}, token {col} is {float(lp[row, col])!r} on a real token (loss_mask 1): "
            "log-probs must be finite and <= 0; fix the rollout that produced this row")


def prepare_microbatches(batch: Mapping[str, Optional[torch.Tensor]], loss_config: LossConfig,
                         micro_batch_size: int, dp_group=None, *, cp_group=None,
                         calculate_per_token_loss: bool = False, vocab_size: Optional[int] = None
                         ) -> list[dict]:
    """Split this DP rank's share of one mini-batch into micro-batches carrying exact global weights.

    Call once per optimizer step, on every DP rank (it issues collectives over ``dp_group``: one
    all-reduce(max) of the micro-batch count (with the flags of the mask and log-prob checks) plus the ``token_weights`` counts of each distinct mode in
    use, plus one all-reduce(sum) of the real-token total under ``calculate_per_token_loss``; none per
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
            ``advantages [B]`` or ``[B, S]``; ``old_logprobs [B, S]`` proximal ("old") log-probs of
            ``labels`` (optional: None means on-policy, ratio 1 with the detached current log-probs; checked
            here, once: finite and ``<= 0`` on every real token, else a ValueError naming the row);
            ``behaviour_logprobs [B, S]`` log-probs of ``labels`` under the policy that sampled them
            (optional, needs ``old_logprobs``; required when ``loss_config.is_level != 'off'``): checked
            (shape; finite and <= 0 on loss tokens) with the mask, then the importance weights of
            :mod:`megatron_rl_agg.core.corrections` are computed here from the full rows (with
            ``is_self_normalize`` one more all-reduce(sum) over ``dp_group``); under
            ``is_denominator='survivors'`` the zero-weight tokens leave ``loss_mask`` before any
            aggregation weight is counted;
            ``ref_logprobs [B, S]`` (required when ``kl_coef > 0``); ``group_ids [B]`` int64 global
            prompt-group ids (required by ``prompt_mean``); ``attention_mask`` (optional, passed to the
            model; sliced by rows when its first dim is ``B``, padding rows copying the last row's mask);
            ``routes [B, S, L, k]`` int64 MoE expert indices to replay (optional,
            :mod:`megatron_rl_agg.mcore.routing_replay`): sliced and CP-split like every per-token tensor,
            padding rows get ``padding_routes``;
            ``token_mask [B, S]`` (optional) 1 where column ``s`` is a real model input of the row (prompt
            and response tokens), 0 past the row's last token (default: every column of a real row is
            real). With the padding rows it becomes each micro-batch's ``padding_mask`` (True = not a real
            token), which ``forward_step`` hands to an MoE model so that Megatron's aux-loss statistics
            count real tokens only.
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
        vocab_size: the model's (padded) vocabulary size ``V``, optional. The smallest and largest label
            of the mini-batch (over the DP group) are read here once, on the all-reduce of the
            micro-batch count (no read of their own), and stored as ``label_range``. With ``vocab_size``
            they are checked against ``[0, V)`` here, before any micro-batch runs; either way
            :func:`loss_func` checks them against the logits' vocabulary (shard width x TP size, host
            integers), so it reads nothing back from the device, with or without ``vocab_size``.

    Returns:
        ``M`` dicts (``M`` equal on every DP rank: the largest ``ceil(B / micro_batch_size)``; rows are
        padded with fully masked rows, which change nothing). Each holds the sliced row tensors (``[b, S / C]``
        per-token tensors under CP) plus ``pg_weights``, ``kl_weights``, ``entropy_weights`` (float64),
        with ``behaviour_logprobs`` also ``is_weights`` (float64), ``is_log_ratio`` (float64) and ``is_flags``
        (int8), ``num_microbatches`` (``M``), ``dp_size``, ``cp_size``, ``calculate_per_token_loss``, ``padding_mask`` (bool ``[b, S / C]``, True on
        padding rows and on ``token_mask == 0``), ``no_real_token`` (bool: the whole micro-batch, every CP
        shard, has no real token), ``aux_scale`` (float: the MoE aux / z-loss coefficient factor, 0 without a
        real token, ``N / (M * D * n_k)`` under the flag, else 1), ``empty_microbatches`` / ``any_padding`` (bool, the same on every DP rank:
        some rank has such a micro-batch / any padding token; see :mod:`megatron_rl_agg.mcore.moe_padding`), under the flag
        ``num_tokens`` (int32, the shard's real tokens ``sum(~padding_mask)``) and ``total_tokens`` (``N``, float64, the sum of
        ``num_tokens`` over every micro-batch and dp x cp rank), ``loss_config``, ``vocab_size`` (None when
        not given) and ``label_range`` (``(min, max)`` label id of the mini-batch over the DP group, ints).
        Pass
        ``num_microbatches=M`` and ``seq_length=S`` (the FULL length) to Megatron's schedule.
    """
    positive_int(micro_batch_size, "micro_batch_size")
    n_rows, seq = _check_batch(batch, loss_config)
    positive_int(vocab_size, "vocab_size", optional=True)
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
    # The 0/1 check of the mask rides on the same all-reduce, so a bad mask on one rank raises on all, and
    # so do the label range [min, max] over the DP group (max of -min) and the behaviour / reference
    # log-prob checks (finite and <= 0 on real tokens): the one read of this function, after which no label
    # check reads the device (loss_func compares host ints with the logits' shape).
    problem = _mask_problem(batch["loss_mask"])
    labels = batch["labels"].to(torch.int64)
    no_labels = labels.numel() == 0          # a rank with no rows: 0 stands in, in range of any vocabulary
    label_max = labels.new_zeros(()) if no_labels else labels.max()
    neg_label_min = labels.new_zeros(()) if no_labels else -labels.min()
    own_mb = math.ceil(n_rows / micro_batch_size)
    # Real tokens (token_mask != 0; every column of a real row without token_mask). The flags an MoE
    # model's padding mask needs on every rank alike (mcore.moe_padding) ride on the same all-reduce: a
    # micro-batch of this rank without a real token, a padding column, the fewest micro-batches / rows.
    real = (batch["token_mask"] != 0 if batch.get("token_mask") is not None
            else torch.ones(n_rows, seq, dtype=torch.bool, device=device))
    own_real = pad_rows_to(real.sum(1), own_mb * micro_batch_size, fill=0).view(own_mb, micro_batch_size).sum(1)
    empty_local = own_real.eq(0).any().to(torch.int64)
    n_local = torch.cat([torch.stack([torch.tensor(own_mb, device=device), torch.tensor(-own_mb, device=device),
                                      torch.tensor(-n_rows, device=device), empty_local.to(device),
                                      (~real).any().to(torch.int64).to(device),
                                      torch.tensor(int(problem is not None), device=device),
                                      label_max.to(device), neg_label_min.to(device)]),
                         _logprob_flags(batch, loss_config, device)])
    # this rank's real tokens per own micro-batch come back with the same (single) read of the device
    reduced = torch.cat([dist.all_reduce_max(n_local, dp_group), own_real.to(n_local.dtype).to(device)]).tolist()
    reduced, own_real = reduced[:n_local.numel()], reduced[n_local.numel():]
    (num_mb, neg_min_mb, neg_min_rows, any_empty, any_pad_col, any_bad, label_max, neg_label_min,
     *bad_logprobs) = reduced
    if any_bad:
        raise ValueError(problem or "loss_mask of another data-parallel rank holds values other than 0 and 1 "
                                    "(that rank's error names them)")
    for key, bad in zip(_LOGPROB_KEYS, bad_logprobs):
        if bad:
            raise ValueError(_logprob_problem(batch, key))
    label_range = (-neg_label_min, label_max)
    if vocab_size is not None:
        _check_label_bounds(*label_range, vocab_size)
    padded = num_mb * micro_batch_size

    # Global weights from the REAL rows only: padded rows have no loss token and are appended after,
    # with zero weight, so they touch no count and need no group id.
    mask = batch["loss_mask"]
    is_rows: dict[str, torch.Tensor] = {}
    behaviour = batch.get("behaviour_logprobs")
    if behaviour is not None:
        # Off-policy weights from the full rows, once per mini-batch (self-normalization: one all-reduce
        # over the DP group). Under is_denominator='survivors' the zero-weight tokens leave the loss mask
        # here, before any aggregation weight is counted.
        isw = mini_batch_importance_weights(batch["old_logprobs"], behaviour, mask, loss_config, dp_group)
        mask = isw.counted.to(mask.dtype)
        is_rows = {"is_weights": isw.weights, "is_log_ratio": isw.log_ratio, "is_flags": isw.flags}
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
    rows["loss_mask"] = mask
    rows.update(is_rows)
    if rows["position_ids"] is None:
        rows["position_ids"] = torch.arange(seq, device=device).unsqueeze(0).expand(n_rows, seq)
    attn = rows.pop("attention_mask")
    routes = batch.get("routes")
    rows = {k: pad_rows_to(v, padded) for k, v in rows.items()}
    # Not a real token: padding rows and the columns past a row's last token (token_mask == 0). An MoE
    # model leaves them out of its aux-loss statistics (forward_step passes Megatron's padding_mask;
    # mcore.moe_padding).
    rows["padding_mask"] = pad_rows_to(~real, padded, fill=True)
    real_counts = [int(own_real[k]) if k < own_mb else 0 for k in range(num_mb)]   # past own_mb: padding rows
    any_padding = bool(any_pad_col or -neg_min_rows < padded)
    extra: dict[str, Any] = {}
    if calculate_per_token_loss:
        # Megatron sums the returned num_tokens over micro-batches and dp x cp ranks (finalize_model_grads)
        # and divides the gradient by that total N. num_tokens is the shard's REAL token count (padding
        # rows and columns excluded: the count an MoE router scales its aux loss by under the flag when
        # it gets the padding mask). The C CP ranks of a DP rank hold the shards of the same rows, so
        # N = sum over DP ranks of this rank's real tokens: one all-reduce over the DP group.
        local_real = real.sum().to(torch.float64).reshape(1)
        extra = {"total_tokens": dist.all_reduce_sum(local_real, dp_group)[0]}
    # The MoE aux / z-loss scale of each micro-batch (mcore.moe_padding): 0 without a real token (left out);
    # under the flag Megatron multiplies micro-batch k's aux loss by its real tokens n_k and divides by N,
    # so N / (M * D * n_k) restores the 1 / (M * D) of the flag-off schedule (one more read, per call).
    n_total = float(extra["total_tokens"]) if calculate_per_token_loss else 0.0
    aux_scale = [0.0 if n == 0 else (n_total / (num_mb * dp_size * n) if calculate_per_token_loss else 1.0)
                 for n in real_counts]
    if routes is not None:
        # MoE routing replay: padding rows replay experts 0 .. k-1 (valid and distinct; no loss weight)
        pad = padding_routes((padded - n_rows,) + tuple(routes.shape[1:3]), routes.shape[3], routes.device)
        rows["routes"] = torch.cat([routes.to(torch.int64), pad], dim=0)
    if attn is not None and attn.shape[0] == n_rows and padded > n_rows:
        if n_rows == 0:
            raise ValueError("a per-row attention_mask cannot be padded on a rank with no rows; pass a mask "
                             "shared by all rows (first dim 1) or give every DP rank at least one row")
        # Padding rows copy a real row's mask: an all-masked attention row would give NaN logits there,
        # and NaN times a zero weight is still NaN in the backward pass.
        attn = torch.cat([attn, attn[-1:].expand((padded - n_rows,) + tuple(attn.shape[1:]))], dim=0)

    sequence_level = get_policy_loss(loss_config.policy_loss).level == SEQUENCE
    micro_batches = []
    for k in range(num_mb):
        sl = slice(k * micro_batch_size, (k + 1) * micro_batch_size)
        mb = {key: (v[sl] if v is not None else None) for key, v in rows.items()}
        mb["attention_mask"] = attn[sl] if attn is not None and attn.shape[0] == padded else attn
        if sequence_level:
            # Sequence-level policy losses (mcore.sequence_ratio): each row's loss-token count from the FULL
            # row (before the CP split) and its index in the micro-batch (packing broadcasts both per token).
            mb["row_tokens"] = mb["loss_mask"].sum(-1).to(torch.float64)
            mb["row_id"] = torch.arange(micro_batch_size, device=device)
            mb["rows_per_microbatch"] = micro_batch_size
        # The micro-batch mean divides by the WHOLE micro-batch's tokens (all CP shards): full rows here.
        local_mean = microbatch_mean_weights(mb["loss_mask"], dtype=torch.float64)
        for key, w in global_w.items():
            mb[key] = w[sl] if w is not None else local_mean
        if cp_size > 1:
            for key in _TOKEN_KEYS:
                if mb.get(key) is not None and mb[key].dim() >= 2:  # [b, S, ...] (advantages may be [b])
                    mb[key] = split_for_cp_rank(mb[key], cp_size, cp_rank, dim=1)
        # mcore.moe_padding: this micro-batch (all its CP shards) holds no real token (its MoE aux loss is
        # left out); some DP rank has such a micro-batch / any padding token (the same on every DP rank)
        mb["no_real_token"] = real_counts[k] == 0
        mb["aux_scale"] = aux_scale[k]
        mb["empty_microbatches"] = bool(any_empty or -neg_min_mb < num_mb)
        mb["any_padding"] = any_padding
        if calculate_per_token_loss:
            mb["num_tokens"] = (~mb["padding_mask"]).sum().to(torch.int32)
        mb.update(num_microbatches=num_mb, dp_size=dp_size, cp_size=cp_size,
                  calculate_per_token_loss=bool(calculate_per_token_loss), loss_config=loss_config,
                  vocab_size=vocab_size, label_range=label_range, **extra)
        micro_batches.append(mb)
    return micro_batches
