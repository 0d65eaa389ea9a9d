"""A context-parallel core attention for Megatron's local (non-Transformer-Engine) layer spec.

Megatron-Core's local ``DotProductAttention`` asserts ``context_parallel_size == 1``; only Transformer
Engine's attention implements CP. This module gives the local spec a CP-capable drop-in
(:class:`ContextParallelDotProductAttention`, same constructor and ``forward`` as
``DotProductAttention``) so context parallelism runs where TE is absent, e.g. on a CPU with gloo. On a GPU
with TE the TE spec's own CP attention (ring attention) is used and this module is not involved
(:func:`megatron_rl_agg.mcore.spec.default_layer_spec`).

The algorithm (all-gather K/V). CP rank ``r`` holds the queries, keys and values of its zigzag positions
``P_r`` (:func:`megatron_rl_agg.core.context_parallel.zigzag_indices`; ``|P_r| = S / C``). Each rank gathers
the keys and values of ALL ranks (``[C, S/C, b, g, d]``, one all-gather each, autograd-correct through
:func:`megatron_rl_agg.parallel.dist.all_gather_stacked`: the backward all-reduces the K/V gradient over the CP
group and keeps this rank's slice), and attends with the causal mask written in GLOBAL positions:

    score[q, k] = softmax_scale * <Q_q, K_k>,   masked where  pos(k) > pos(q),
    out[q] = sum_k softmax_k(score[q, :]) V_k.

Keys stay in gathered (rank) order: the softmax does not care about the order of its keys, only the mask
must pair each key with its global position. Memory is that of full-sequence attention for this rank's
``S / C`` queries (``[b, heads, S/C, S]`` scores): a test and small-scale path, not a long-context kernel.

Not supported (clear errors): packed THD sequences (``packed_seq_params``), an explicit attention mask or
bias, non-causal mask types, sliding windows and non-vanilla softmax types.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch

from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from megatron_rl_agg.parallel import dist
from megatron_rl_agg.core.context_parallel import zigzag_indices

__all__ = ["ContextParallelDotProductAttention", "cp_local_layer_spec"]


class ContextParallelDotProductAttention(MegatronModule):
    """Causal core attention over zigzag CP shards (all-gather K/V); works at any CP size, CP = 1 included.

    Inputs (Megatron's core-attention contract, this TP rank's heads): ``query [s, b, n_p, d]``,
    ``key``/``value`` ``[s, b, g_p, d]`` with ``s = S / C`` local positions, ``n_p`` query heads and
    ``g_p`` key/value groups per TP partition. Returns ``[s, b, n_p * d]``.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if getattr(config, "window_size", None) is not None:
            raise ValueError(f"ContextParallelDotProductAttention does not support window_size="
                             f"{config.window_size}; use Transformer Engine's attention for sliding windows")
        softmax_type = getattr(config, "softmax_type", "vanilla")
        if softmax_type != "vanilla":
            raise ValueError(f"ContextParallelDotProductAttention supports softmax_type='vanilla' only, got "
                             f"{softmax_type!r}")
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"ContextParallelDotProductAttention is causal only, got attn_mask_type="
                             f"{attn_mask_type}; valid: {AttnMaskType.causal}")
        tp = parallel_state.get_tensor_model_parallel_world_size()
        projection = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection, tp)
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        head_dim = divide(projection, config.num_attention_heads)
        # The same scale as DotProductAttention: 1/sqrt(d) (query-key layer scaling divides the scores
        # by the layer number and multiplies them back inside the softmax: no net change in fp32).
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.attention_dropout = torch.nn.Dropout(
            config.attention_dropout if attention_dropout is None else attention_dropout)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError(
                "packed (THD) sequences are not supported by ContextParallelDotProductAttention (the local "
                "spec's context-parallel attention): drop --sequence-packing under context parallelism, or "
                "use Transformer Engine's attention on a GPU")
        if attention_bias is not None or attention_mask is not None:
            raise ValueError(
                "ContextParallelDotProductAttention builds its causal mask from the global zigzag positions "
                "and takes no attention_mask or attention_bias; pass attention_mask=None (right-padded rows "
                "need none under a causal mask)")
        group = (parallel_state.get_context_parallel_group()
                 if parallel_state.get_context_parallel_world_size() > 1 else None)
        cp_size, cp_rank = dist.world_size(group), dist.rank(group)
        local = query.shape[0]
        seq = local * cp_size
        # [C, s, b, g, d] -> [C * s, b, g, d]: every rank's keys / values, rank order.
        keys = dist.all_gather_stacked(key, group).flatten(0, 1)
        values = dist.all_gather_stacked(value, group).flatten(0, 1)
        q_pos = zigzag_indices(seq, cp_size, cp_rank, device=query.device)
        k_pos = torch.cat([zigzag_indices(seq, cp_size, r, device=query.device) for r in range(cp_size)])
        repeat = self.heads_per_partition // self.groups_per_partition
        if repeat > 1:   # grouped-query attention: each key/value group serves `repeat` query heads
            keys = keys.repeat_interleave(repeat, dim=2)
            values = values.repeat_interleave(repeat, dim=2)
        scores = torch.einsum("qbnd,kbnd->bnqk", query, keys).float() * self.softmax_scale   # [b, n, s, S]
        future = k_pos.unsqueeze(0) > q_pos.unsqueeze(1)                                     # [s, S]
        # Every query sees at least itself, so no row is fully masked (no NaN).
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).to(query.dtype)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            probs = self.attention_dropout(probs)
        context = torch.einsum("bnqk,kbnd->qbnd", probs, values)                             # [s, b, n, d]
        return context.reshape(local, query.shape[1], self.hidden_size_per_partition)


def cp_local_layer_spec(**local_spec_kwargs):
    """``get_gpt_layer_local_spec(**kwargs)`` with :class:`ContextParallelDotProductAttention` as core
    attention (pass it as ``layer_spec=`` of :func:`megatron_rl_agg.mcore.build.build_model`)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if local_spec_kwargs.get("multi_latent_attention"):
        raise ValueError("cp_local_layer_spec does not support multi_latent_attention=True")
    spec = copy.deepcopy(get_gpt_layer_local_spec(**local_spec_kwargs))
    spec.submodules.self_attention.submodules.core_attention = ContextParallelDotProductAttention
    return spec
