"""Sequence packing (THD format) for the loss path.

A padded micro-batch holds ``B`` rows of width ``S``; row ``b`` has ``len_b`` real tokens at columns
``0 .. len_b - 1`` (right padding). Packing concatenates the real tokens of every row into one
sequence of ``T = sum_b len_b`` tokens (plus an optional filler segment, see ``make_layout``)
and describes the row boundaries with ``cu_seqlens = [0, len_0, len_0 + len_1, ..., T]``, which is what
Megatron's ``PackedSeqParams(qkv_format="thd")`` carries to the attention.

Why packed and padded runs give the same loss and gradients:

- attention is block-diagonal causal over ``cu_seqlens`` (token i of row b sees exactly the tokens
  0..i of row b, as in the padded causal layout, where a real token never sees padding);
- positions restart at 0 in every row (``position_ids`` for learned embeddings; RoPE restarts per
  ``cu_seqlens`` segment inside Megatron's THD rotary path);
- every per-token tensor of the loss path (labels, loss mask, the aggregation weights ``w`` of
  ``aggregation.token_weights``, old/reference log-probs, advantages) is moved with the same gather,
  so ``sum(w * values)`` sums the same products; padding positions carry ``w = 0`` in the padded
  layout and simply do not exist in the packed one.

Public API:

- ``lengths_from_mask(mask[B,S]) -> [B]``: row lengths of a right-padded attention mask.
- ``lengths_from_loss_mask(loss_mask[B,S]) -> [B]``: lengths trimmed after the last loss token.
- ``PackedLayout`` / ``make_layout(lengths[B], row_width, pad_to_multiple_of=1, total_length=None)``.
- ``pack(x[B,S,...], layout) -> [1,T,...]`` and ``unpack(x[1,T,...], layout) -> [B,S,...]``
  (differentiable, used to compare per-token log-probs with the padded layout).
- ``pack_micro_batch(batch, lengths, ...) -> (packed_batch, layout)``: packs every ``[B,S,...]`` tensor
  (and per-row ``[B]`` value) of a micro-batch dict, adds ``position_ids`` and ``packed_seq_params``.
- ``pack_microbatches(micro_batches)`` and ``packed_forward_step(data_iterator, model)``: the packed
  loss path on top of ``mcore.batch.prepare_microbatches`` / ``mcore.loss.make_loss_func`` (unchanged).
- ``packed_seq_params(layout) -> PackedSeqParams``.
- ``add_sequence_packing_args(parser)``: the ``--sequence-packing`` trainer flags.

The attention that consumes the packs (``PackedDotProductAttention``, ``packed_local_layer_spec``, or
Transformer Engine's THD path on GPU) lives in :mod:`megatron_rl_agg.mcore.packed_attention`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.utils import get_model_config

from megatron_rl_agg.mcore import moe_padding, routing_replay
from megatron_rl_agg.mcore.loss import make_loss_func
from megatron_rl_agg.core.validate import positive_int

__all__ = [
    "PackedLayout",
    "lengths_from_mask",
    "lengths_from_loss_mask",
    "make_layout",
    "pack",
    "unpack",
    "pack_micro_batch",
    "pack_microbatches",
    "packed_forward_step",
    "packed_seq_params",
    "add_sequence_packing_args",
]


@dataclass(frozen=True)
class PackedLayout:
    """Where each row's tokens sit inside the packed sequence.

    Attributes:
        lengths: ``[B]`` int64, real tokens per row (each >= 1).
        row_width: ``S``, the padded width rows are unpacked to.
        index: ``[sum len]`` int64; packed position p holds padded element ``index[p]`` of the
            flattened ``[B*S]`` rows, i.e. ``index[p] = b * S + j`` for column j of row b.
        cu_seqlens: ``[n_seg + 1]`` int32, segment boundaries; ``n_seg = B``, plus one filler
            segment when the pack was padded to a multiple.
        max_seqlen: longest segment (rows and filler), the ``max_seqlen_q/kv`` of THD attention.
        total_length: ``T = cu_seqlens[-1]``, packed length including the filler.
    """

    lengths: Tensor
    row_width: int
    index: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    total_length: int

    @property
    def num_rows(self) -> int:
        return int(self.lengths.numel())

    @property
    def num_real_tokens(self) -> int:
        return int(self.index.numel())


def lengths_from_mask(mask: Tensor) -> Tensor:
    """Row lengths of a right-padded ``[B, S]`` attention mask (1 = real token).

    Returns ``[B]`` int64 ``len_b = sum_j mask[b, j]``. Raises ValueError if a row is not a prefix of
    ones followed by zeros (left padding or holes cannot be packed by dropping the tail).
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, S], got shape {tuple(mask.shape)}")
    m = mask.to(torch.bool)
    lengths = m.sum(dim=1).to(torch.int64)
    cols = torch.arange(m.shape[1], device=m.device)
    prefix = cols.unsqueeze(0) < lengths.unsqueeze(1)
    bad = (prefix != m).any(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"mask rows {rows} are not right-padded (ones then zeros); cannot pack them")
    return lengths


def lengths_from_loss_mask(loss_mask: Tensor) -> Tensor:
    """Shortest row lengths that keep every loss token: ``len_b = max(1, 1 + last j with m[b, j] != 0)``.

    Exact for the loss path even when the real rows are longer: attention is causal, so tokens after a
    row's last loss token never influence a loss token's log-prob, and they carry zero weight. An
    all-masked row (e.g. a DP padding row) keeps one token. Returns ``[B]`` int64.
    """
    if loss_mask.dim() != 2:
        raise ValueError(f"loss_mask must be [B, S], got shape {tuple(loss_mask.shape)}")
    cols = torch.arange(1, loss_mask.shape[1] + 1, device=loss_mask.device)
    # (j + 1) on loss tokens, 0 elsewhere; the row max is the last loss position + 1
    return (loss_mask.ne(0) * cols).amax(dim=1).clamp(min=1).to(torch.int64)


def make_layout(lengths: Tensor, row_width: int, *, pad_to_multiple_of: int = 1,
                total_length: Optional[int] = None) -> PackedLayout:
    """Build the packed layout of rows with ``lengths[B]`` real tokens in a ``[B, row_width]`` batch.

    ``pad_to_multiple_of`` > 1 appends a filler segment so that ``T`` is a multiple of it (needed by
    sequence parallelism, where T must divide by the TP size); ``total_length`` pads to exactly that
    many tokens instead (a common length for every micro-batch of a pipeline-parallel step; it must be
    >= sum(lengths) and a multiple of ``pad_to_multiple_of``). The filler is its own ``cu_seqlens``
    segment, so it attends only to itself, and ``pack`` fills it with zeros (loss mask and weights 0).
    """
    positive_int(row_width, "row_width")
    positive_int(pad_to_multiple_of, "pad_to_multiple_of")
    lengths = torch.as_tensor(lengths).to(torch.int64)
    if lengths.dim() != 1 or lengths.numel() == 0:
        raise ValueError(f"lengths must be a non-empty [B] tensor, got shape {tuple(lengths.shape)}")
    bad = (lengths < 1) | (lengths > row_width)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"row lengths must lie in [1, {row_width}]; rows {rows} have lengths "
            f"{lengths[bad].tolist()}"
        )
    n_real = int(lengths.sum())
    total = -(-n_real // pad_to_multiple_of) * pad_to_multiple_of
    if total_length is not None:
        if total_length < total or total_length % pad_to_multiple_of:
            raise ValueError(f"total_length={total_length} must be >= {total} (the rows' {n_real} tokens "
                             f"rounded up to a multiple of pad_to_multiple_of={pad_to_multiple_of}) and a "
                             "multiple of pad_to_multiple_of")
        total = total_length
    seg = lengths if total == n_real else torch.cat([lengths, lengths.new_tensor([total - n_real])])
    cu_seqlens = torch.zeros(seg.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu_seqlens[1:] = torch.cumsum(seg, 0)
    starts = cu_seqlens[:-1][: lengths.numel()].to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    # column of packed token p inside its row = p - start of its row
    cols = torch.arange(n_real, device=lengths.device) - torch.repeat_interleave(starts, lengths)
    return PackedLayout(
        lengths=lengths,
        row_width=row_width,
        index=rows * row_width + cols,
        cu_seqlens=cu_seqlens,
        max_seqlen=int(seg.max()),
        total_length=total,
    )


def pack(x: Tensor, layout: PackedLayout) -> Tensor:
    """Gather the real tokens of ``x[B, S, ...]`` into ``[1, T, ...]`` (filler positions are 0)."""
    b, s = layout.num_rows, layout.row_width
    if tuple(x.shape[:2]) != (b, s):
        raise ValueError(f"expected a [{b}, {s}, ...] tensor to pack, got shape {tuple(x.shape)}")
    rest = tuple(x.shape[2:])
    out = x.reshape((b * s,) + rest).index_select(0, layout.index.to(x.device))
    n_fill = layout.total_length - layout.num_real_tokens
    if n_fill:
        out = torch.cat([out, out.new_zeros((n_fill,) + rest)], dim=0)
    return out.unsqueeze(0)


def unpack(x: Tensor, layout: PackedLayout, fill: float = 0.0) -> Tensor:
    """Scatter a packed ``[1, T, ...]`` tensor back to ``[B, S, ...]``.

    Padding columns get ``fill``; filler tokens are dropped. Differentiable in ``x`` (index_copy).
    """
    if x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != layout.total_length:
        raise ValueError(
            f"expected a packed [1, {layout.total_length}, ...] tensor, got shape {tuple(x.shape)}"
        )
    flat = x[0]
    rest = tuple(flat.shape[1:])
    b, s = layout.num_rows, layout.row_width
    out = flat.new_full((b * s,) + rest, fill)
    out = out.index_copy(0, layout.index.to(flat.device), flat[: layout.num_real_tokens])
    return out.reshape((b, s) + rest)


def packed_seq_params(layout: PackedLayout) -> PackedSeqParams:
    """Megatron ``PackedSeqParams`` for self-attention over ``layout`` (q and kv share boundaries)."""
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=layout.cu_seqlens,
        cu_seqlens_kv=layout.cu_seqlens,
        max_seqlen_q=layout.max_seqlen,
        max_seqlen_kv=layout.max_seqlen,
    )


def _must_be_zero_on_padding(key: str) -> bool:
    # loss_mask and every aggregation weight (weights, pg_weights, kl_weights, entropy_weights, ...)
    return key == "loss_mask" or key.endswith("weights")


def pack_micro_batch(
    batch: Mapping[str, object],
    lengths: Tensor,
    *,
    pad_to_multiple_of: int = 1,
    total_length: Optional[int] = None,
) -> Tuple[Dict[str, object], PackedLayout]:
    """Pack one padded micro-batch into a single THD sequence.

    Args:
        batch: micro-batch dict (e.g. one entry of ``mcore.batch.prepare_microbatches``), with
            ``tokens [B, S]``. Every tensor shaped ``[B, S, ...]`` is packed to ``[1, T, ...]``; every
            1-D tensor of length ``B`` is a per-row value (e.g. ``advantages [B]``) and is broadcast to
            its row's tokens first, so it stays attached to the right row; other entries are copied
            unchanged. ``loss_mask`` and every ``*weights`` tensor must be zero on padding columns.
            ``attention_mask`` must be None (packed attention is causal within each row).
        lengths: ``[B]`` real tokens per row (``lengths_from_loss_mask`` or ``lengths_from_mask``).
        pad_to_multiple_of, total_length: see ``make_layout``.

    Returns:
        ``(packed, layout)``. ``packed["position_ids"]`` is the packed ``batch["position_ids"]`` when
        given, else ``0 .. len_b - 1`` per row (filler: 0); ``packed["attention_mask"]`` is None,
        ``packed["packed_seq_params"]`` the THD parameters and ``packed["packed_layout"]`` the layout
        (for ``unpack``).
    """
    tokens = batch.get("tokens")
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError("batch['tokens'] must be a [B, S] tensor to pack a micro-batch")
    if int(batch.get("cp_size", 1) or 1) > 1:
        raise ValueError(
            f"pack_micro_batch cannot pack a micro-batch prepared for context parallelism (cp_size="
            f"{batch['cp_size']}): its rows are already zigzag shards. Packed (THD) sequences under CP are "
            "not supported here; use padded micro-batches under CP, or context_parallel_size=1 to pack")
    if batch.get("attention_mask") is not None:
        raise ValueError("pack_micro_batch needs attention_mask=None: packed attention is causal within "
                         "each row by construction (cu_seqlens); a custom mask cannot be packed")
    b, s = tokens.shape
    layout = make_layout(torch.as_tensor(lengths, device=tokens.device), s,
                         pad_to_multiple_of=pad_to_multiple_of, total_length=total_length)
    if layout.num_rows != b:
        raise ValueError(f"got {layout.num_rows} lengths for {b} rows")
    padding = torch.arange(s, device=tokens.device).unsqueeze(0) >= layout.lengths.unsqueeze(1)
    packed: Dict[str, object] = dict(batch)
    for key, value in batch.items():
        if not isinstance(value, Tensor):
            continue
        if value.dim() == 1 and value.shape[0] == b:
            value = value.unsqueeze(1).expand(b, s)  # per-row value -> every token of its row
        elif tuple(value.shape[:2]) != (b, s):
            continue
        if _must_be_zero_on_padding(key):
            off = value.reshape(b, s, -1).ne(0).any(-1) & padding
            if bool(off.any()):
                raise ValueError(
                    f"batch[{key!r}] is nonzero beyond the row length in rows "
                    f"{off.any(1).nonzero().flatten().tolist()}; packing would drop those entries"
                )
        packed[key] = pack(value, layout)
    if batch.get("position_ids") is None:
        pos = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
        packed["position_ids"] = pack(pos, layout)
    packed["attention_mask"] = None
    packed["packed_seq_params"] = packed_seq_params(layout)
    packed["packed_layout"] = layout
    if isinstance(batch.get("padding_mask"), Tensor):
        # packing keeps a row up to its last loss token: a micro-batch may be left without a real token
        # (mcore.moe_padding leaves out its MoE aux loss); one host read per pack, as the checks above
        # and the router then counts the packed real tokens: the MoE aux scale follows (mcore.batch)
        real = int((~packed["padding_mask"][:, : layout.num_real_tokens]).sum())
        packed["no_real_token"] = real == 0
        scale = float(batch.get("aux_scale", 1.0))
        if batch.get("calculate_per_token_loss") and real:
            scale *= int(batch["num_tokens"]) / real
        packed["aux_scale"] = 0.0 if real == 0 else scale
    packed["packed_fixed_length"] = total_length
    return packed, layout


def _tokens_to_keep(mb: Mapping[str, object]) -> Tensor:
    """The loss mask, widened by the off-policy correction's loss tokens (``is_flags`` bit 1): under
    ``is_denominator='survivors'`` rejected tokens leave the loss mask but stay in its metrics."""
    flags = mb.get("is_flags")
    mask = mb["loss_mask"]
    return mask if flags is None else torch.maximum(mask, (flags & 1).to(mask.dtype))


def pack_microbatches(micro_batches: Sequence[Mapping[str, object]], *, pad_to_multiple_of: int = 1,
                      equal_length: bool = False) -> list:
    """Pack every micro-batch of ``mcore.batch.prepare_microbatches`` (one THD sequence each).

    Row lengths are ``lengths_from_loss_mask``: each row is cut after its last loss token, which
    changes no loss term (see there). The per-token weights computed for the whole mini-batch move
    with their tokens, so the loss function needs no change. Run the result with
    ``packed_forward_step``.

    ``equal_length=True`` pads every pack to the longest one (``L = max_k T_k``), so all micro-batches
    of the step have one shape: what Megatron's pipeline schedules expect when
    ``variable_seq_lengths=False`` (pass ``seq_length=L, micro_batch_size=1``). Under PP this is the
    option that also works with the interleaved (VPP) schedule.
    """
    lengths = [lengths_from_loss_mask(_tokens_to_keep(mb)) for mb in micro_batches]
    total = None
    if equal_length:
        total = max(-(-int(n.sum()) // pad_to_multiple_of) * pad_to_multiple_of for n in lengths)
    return [pack_micro_batch(mb, n, pad_to_multiple_of=pad_to_multiple_of, total_length=total)[0]
            for mb, n in zip(micro_batches, lengths)]


def packed_forward_step(data_iterator, model):
    """``forward_step_func`` for packed micro-batches (``pack_microbatches``).

    Same as ``mcore.loss.forward_step`` but hands ``packed_seq_params`` to the model (GPTModel
    passes it down to every attention layer and to the THD RoPE path); the loss function is
    ``mcore.loss.make_loss_func`` unchanged, applied to ``[1, T]`` per-token tensors.

    Under pipeline parallelism the stages must know each micro-batch's activation shape: either
    every pack has one length (``pack_microbatches(..., equal_length=True)``, required with virtual
    stages) or the model config has ``variable_seq_lengths=True`` so that stages exchange shapes
    (checked here).
    """
    micro_batch = next(data_iterator)
    params = micro_batch.get("packed_seq_params")
    if params is None:
        raise ValueError("packed_forward_step got a micro-batch without 'packed_seq_params'; build it "
                         "with pack_microbatches / pack_micro_batch")
    config = get_model_config(model)
    pp, vpp = config.pipeline_model_parallel_size, config.virtual_pipeline_model_parallel_size
    if pp > 1 and micro_batch.get("packed_fixed_length") is None:
        # Unequal packs need the stages to exchange shapes. Megatron-Core 0.16's interleaved schedule with
        # variable_seq_lengths hangs at PP2+VPP2 on gloo, so with virtual stages only equal packs pass.
        if vpp is not None:
            raise ValueError(f"sequence packing with virtual pipeline stages (vpp={vpp}) needs packs of one "
                             "length: use pack_microbatches(..., equal_length=True)")
        if not config.variable_seq_lengths:
            raise ValueError(
                f"sequence packing with pipeline_model_parallel_size={pp}: packed micro-batches differ "
                "in length; pack them with pack_microbatches(..., equal_length=True) or set "
                "variable_seq_lengths=True so that stages exchange activation shapes")
    routes = micro_batch.get("routes")
    if routes is not None:       # MoE routing replay: packed [1, T, L, k], filler after the real tokens
        routing_replay.set_replay(model, routes, num_real_tokens=micro_batch["packed_layout"].num_real_tokens)
    mask = micro_batch.get("padding_mask")
    if mask is not None:         # the filler segment after the real tokens is not a real token either
        real = torch.arange(mask.shape[1], device=mask.device)
        mask = mask | (real >= micro_batch["packed_layout"].num_real_tokens)
    with moe_padding.masked_forward(model, micro_batch, padding_mask=mask) as pad_kw:
        output = model(micro_batch["tokens"], micro_batch["position_ids"], None, packed_seq_params=params,
                       **pad_kw)
    if routes is not None:
        output = routing_replay.mark_backward(model, output)
    return output, make_loss_func(micro_batch, model)


def add_sequence_packing_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--sequence-packing`` and ``--pack-pad-to-multiple-of`` (Megatron extra_args_provider)."""
    group = parser.add_argument_group("sequence packing")
    group.add_argument(
        "--sequence-packing", action="store_true",
        help="Pack the rows of each micro-batch into one THD sequence (no padding tokens). Loss "
             "and gradients equal the padded run. Needs a THD-capable attention: the local "
             "PackedDotProductAttention spec, or Transformer Engine's spec on GPU. Under pipeline "
             "parallelism the packs of a step are padded to one length (pack_microbatches("
             "equal_length=True)) unless the model uses variable_seq_lengths.",
    )
    group.add_argument(
        "--pack-pad-to-multiple-of", type=int, default=1,
        help="Pad each packed sequence with a filler segment to a multiple of this many tokens "
             "(e.g. the TP size under sequence parallelism). Default 1 (no filler).",
    )
    return parser
