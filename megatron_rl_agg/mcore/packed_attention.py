"""Packed (THD) attention for Megatron's local layer spec: the CPU / reference path of sequence packing.

:class:`PackedDotProductAttention` is Megatron's local ``DotProductAttention`` plus a THD path (a dense
block-diagonal causal mask over ``cu_seqlens``, :func:`block_causal_mask`); :func:`packed_local_layer_spec`
is ``get_gpt_layer_local_spec`` with that attention. The packed micro-batches themselves come from
:mod:`megatron_rl_agg.mcore.packing`.

With Transformer Engine (GPU) use TE's own THD path instead: build the model with
``get_gpt_layer_with_transformer_engine_spec()`` and pass the same ``packed_seq_params``;
``TEDotProductAttention`` consumes ``cu_seqlens_q/kv`` and ``max_seqlen_q/kv`` directly.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import attention_mask_func

__all__ = ["block_causal_mask", "PackedDotProductAttention", "packed_local_layer_spec"]


def block_causal_mask(cu_seqlens: Tensor, total_length: int) -> Tensor:
    """``[T, T]`` bool mask, True where attention is FORBIDDEN (Megatron's mask convention).

    Query i may attend key j iff both lie in the same ``cu_seqlens`` segment and ``j <= i``.
    """
    cu = cu_seqlens.to(torch.int64)
    if int(cu[-1]) != total_length:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but the packed sequence has {total_length}"
                         " tokens")
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1])
    pos = torch.arange(total_length, device=cu.device)
    allowed = (seg.unsqueeze(1) == seg.unsqueeze(0)) & (pos.unsqueeze(0) <= pos.unsqueeze(1))
    return ~allowed


class PackedDotProductAttention(DotProductAttention):
    """Megatron's local ``DotProductAttention`` extended with the THD (packed) format.

    Without ``packed_seq_params`` it is exactly the parent class. With ``qkv_format == "thd"``:

    - query ``[T, np, hn]``, key/value ``[T, ng, hn]`` (the b=1 dim already squeezed by ``Attention``);
    - scores ``[np, T, T] = softmax_scale * q k^T``, masked with ``block_causal_mask(cu_seqlens)``,
      softmax (same scaling/fp32 rules as the parent), dropout, then ``context = P v``;
    - returns ``[T, np * hn]`` (``Attention`` reshapes it to ``[T, 1, hp]``).

    The mask is dense, so memory is ``np * T^2`` per layer (the padded layout needs ``B * np * S^2``):
    this is the CPU/reference path; on GPU use Transformer Engine's THD kernels.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)
        sm = self.scale_mask_softmax
        # A separate softmax with an explicit-mask type: with attn_mask_type=causal the fused GPU
        # kernel would apply its own upper-triangular mask and ignore the block-diagonal one.
        self.packed_scale_mask_softmax = FusedScaleMaskSoftmax(
            input_in_fp16=sm.input_in_fp16,
            input_in_bf16=sm.input_in_bf16,
            attn_mask_type=AttnMaskType.padding,
            scaled_masked_softmax_fusion=sm.scaled_masked_softmax_fusion,
            mask_func=attention_mask_func,
            softmax_in_fp32=sm.softmax_in_fp32,
            scale=sm.scale,
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias)
        self._check_packed(packed_seq_params, attention_mask, attention_bias, query)
        t = query.shape[0]
        rep = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if rep > 1:  # grouped-query attention: share each kv head with `rep` query heads
            key = key.repeat_interleave(rep, dim=1)
            value = value.repeat_interleave(rep, dim=1)
        q = query.transpose(0, 1)  # [np, T, hn]
        k = key.transpose(0, 1)  # [np, T, hn]
        v = value.transpose(0, 1)  # [np, T, hn]
        scores = torch.bmm(q, k.transpose(1, 2)) * self.softmax_scale  # [np, T, T]
        mask = block_causal_mask(packed_seq_params.cu_seqlens_q, t).view(1, 1, t, t)
        probs = self.packed_scale_mask_softmax(scores.unsqueeze(0), mask, self.softmax_offset)
        if not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.attention_dropout(probs)
        else:
            probs = self.attention_dropout(probs)
        context = torch.bmm(probs[0].to(v.dtype), v)  # [np, T, hn]
        return context.transpose(0, 1).reshape(t, self.hidden_size_per_partition)

    def _check_packed(self, params, attention_mask, attention_bias, query):
        if params.qkv_format != "thd":
            raise ValueError(f"packed_seq_params.qkv_format must be 'thd', got {params.qkv_format!r}")
        cu_q, cu_kv = params.cu_seqlens_q, params.cu_seqlens_kv
        if cu_q is None or cu_kv is None or not torch.equal(cu_q, cu_kv):
            raise ValueError("packed self-attention needs cu_seqlens_q == cu_seqlens_kv (both set)")
        for name in ("cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
            padded = getattr(params, name)
            if padded is not None and not torch.equal(padded, cu_q):
                raise ValueError(f"{name} != cu_seqlens_q is not supported by the local THD path")
        if attention_mask is not None:
            raise ValueError("packed (thd) attention takes attention_mask=None; the mask comes "
                             "from cu_seqlens")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by PackedDotProductAttention")
        if self.scale_mask_softmax.window_size is not None:
            raise ValueError(f"sliding-window attention (window_size="
                             f"{self.scale_mask_softmax.window_size}) is not supported with packing")
        if query.dim() != 3:
            raise ValueError(f"thd query must be [T, heads, head_dim], got shape {tuple(query.shape)}")


def packed_local_layer_spec(**local_spec_kwargs) -> ModuleSpec:
    """``get_gpt_layer_local_spec(**kwargs)`` with ``PackedDotProductAttention`` as core attention.

    Pass the result as ``transformer_layer_spec`` of ``GPTModel`` (or ``layer_spec=`` of
    ``model.build_model``). Multi-latent attention is not covered.
    """
    if local_spec_kwargs.get("multi_latent_attention"):
        raise ValueError("packed_local_layer_spec does not support multi_latent_attention=True")
    spec = copy.deepcopy(get_gpt_layer_local_spec(**local_spec_kwargs))
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = PackedDotProductAttention
    return spec
