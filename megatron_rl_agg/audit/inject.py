"""The ``--inject-bug`` self-test: deliberately wrong correction factors planted in the prepared
micro-batches, so that the audit must print FAIL rows (see :mod:`megatron_rl_agg.audit`)."""

from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Iterator, Optional

import torch

from megatron_rl_agg.core.aggregation import get_aggregation
from megatron_rl_agg.core.config import MICROBATCH_MEAN, LossConfig


def _inject(bug: Optional[str], micro_batches: list, local: dict, cfg: LossConfig, mbs: int) -> None:
    """Apply the ``--inject-bug`` self-test to the prepared micro-batches (in place)."""
    if bug is None:
        return
    if bug == "cp_shard_sequence_ratio":
        # The count half of the shard-local ratio (the numerator half is :func:`_injected_forward`): each
        # row's loss tokens on THIS CP shard instead of the full row's.
        for mb in micro_batches:
            if "row_tokens" in mb:
                mb["row_tokens"] = mb["loss_mask"].sum(-1).to(torch.float64)
        return
    if bug == "is_microbatch_normalization":
        # The importance weights self-normalized over each micro-batch's counted tokens (this rank's, this CP
        # shard's: slime's per-micro-batch normalization) instead of over the whole mini-batch. Rescaling the
        # mini-batch-normalized weights by n_mb / sum_mb(w) gives exactly the per-micro-batch normalization.
        from megatron_rl_agg.core.corrections import self_normalize

        for mb in micro_batches:
            w, counted = mb["is_weights"], mb["loss_mask"].to(torch.float64)
            mb["is_weights"] = self_normalize(w, torch.stack([(w * counted).sum(), counted.sum()]))
        return
    if bug == "kl_times_microbatches":
        wrong = dataclasses.replace(cfg, kl_coef=cfg.kl_coef * len(micro_batches))
        for mb in micro_batches:
            mb["loss_config"] = wrong
        return
    # local_token_count: global weights from this rank's counts only (process_group=None).
    # cp_token_count: counts summed over dp x cp, where the CP ranks of a DP rank hold the same rows.
    from megatron.core import parallel_state

    from megatron_rl_agg.parallel.weights import token_weights
    from megatron_rl_agg.core.context_parallel import split_for_cp_rank

    group = (parallel_state.get_data_parallel_group(with_context_parallel=True)
             if bug == "cp_token_count" else None)
    cp_size = parallel_state.get_context_parallel_world_size()
    cp_rank = parallel_state.get_context_parallel_rank()

    for key, mode in (("pg_weights", cfg.loss_aggregation), ("kl_weights", cfg.kl_aggregation),
                      ("entropy_weights", cfg.entropy_aggregation)):
        if mode in (MICROBATCH_MEAN, "token_mean_legacy") or (key == "kl_weights" and cfg.kl_coef == 0) \
                or not get_aggregation(mode).exact_global:
            continue
        w = token_weights(local["loss_mask"], mode, group_ids=local["group_ids"],
                          max_response_length=cfg.max_response_length, process_group=group,
                          dtype=torch.float64)
        for k, mb in enumerate(micro_batches):
            mb[key] = split_for_cp_rank(w[k * mbs:(k + 1) * mbs], cp_size, cp_rank, dim=1)


@contextlib.contextmanager
def _injected_forward(bug: Optional[str]) -> Iterator[None]:
    """Around the layout's forward-backward: with ``cp_shard_sequence_ratio`` the per-sequence log-ratio
    numerators of the sequence-level losses (GSPO, GSPO-token, GMPO) are NOT summed over the CP group, so,
    with the shard counts planted by :func:`_inject`, every CP rank uses the mean log-ratio of its own
    shard (the mistake of a GSPO that does not reduce over context parallelism). At cp1 the shard is the
    row and nothing changes. Other bugs: nothing."""
    if bug != "cp_shard_sequence_ratio":
        yield
        return
    from megatron_rl_agg.mcore import sequence_ratio

    real = sequence_ratio.dist
    sequence_ratio.dist = types.SimpleNamespace(all_reduce_sum_differentiable=lambda tensor, group: tensor)
    try:
        yield
    finally:
        sequence_ratio.dist = real
