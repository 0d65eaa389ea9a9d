"""Forward-only passes through Megatron's schedules, at any TP / PP / VPP / CP layout.

The trainer needs three no-gradient passes: next-token logits for sampling, the behaviour log-probs of an
offline batch without them, and the frozen reference policy's log-probs for the KL term. All three run
through ``get_forward_backward_func()(forward_only=True)``, so pipeline stages exchange activations exactly
as in training, and return a per-row result that only exists on the last pipeline stage.
:func:`broadcast_from_last_stage` then gives it to every stage of the pipeline.

Under context parallelism every CP rank of a DP rank passes the same full rows; each runs the model on its
zigzag shard (``context_parallel.split_for_cp_rank``, as in training) and a per-token result is gathered
over the CP group back into full rows (``per_token=True``); a per-row result that one CP rank owns is
summed over the CP group by its ``output_fn`` (see :mod:`megatron_rl_agg.trainer.rollout.generation`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional, Sequence

import torch

from megatron_rl_agg.parallel import dist
from megatron_rl_agg.core.context_parallel import merge_cp_shards, split_for_cp_rank
from megatron_rl_agg.mcore.logprobs import vocab_parallel_logprobs
from megatron_rl_agg.mcore import compat

__all__ = ["run_forward_only", "broadcast_from_last_stage", "compute_logprobs", "microbatch_multiple"]


def microbatch_multiple() -> int:
    """Micro-batch counts must be a multiple of this: PP under interleaving, else 1.

    Megatron's interleaved schedule runs micro-batches in groups of ``PP`` per virtual stage and refuses a
    last group smaller than ``PP`` (and fewer than ``PP`` micro-batches in all).
    """
    from megatron.core import parallel_state

    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    return parallel_state.get_pipeline_model_parallel_world_size() if vpp else 1


def _forward_step(data_iterator, model, *, output_fn: Callable, inference_context=None, recorder=None):
    micro_batch = next(data_iterator)
    if recorder is not None:
        recorder.before(model)
    if inference_context is None:
        output = model(micro_batch["tokens"], micro_batch["position_ids"], None)
    else:
        # the KV cache rows of this micro-batch: rows [offset, offset + b) of the context's buffers
        inference_context.batch_size_offset = micro_batch["row_offset"]
        # Megatron's inference mode gathers the logits over TP itself (it asserts runtime_gather_output)
        output = model(micro_batch["tokens"], micro_batch["position_ids"], None,
                       inference_context=inference_context, runtime_gather_output=True)
    if recorder is not None:
        recorder.after(model, micro_batch)

    def collect(output_tensor):
        # Megatron's forward-only path stores the second element of a 2-tuple; the loss is unused.
        with torch.no_grad():
            return output_tensor.new_zeros(()), {"rows": output_fn(output_tensor, micro_batch)}

    return output, collect


@torch.no_grad()
def run_forward_only(chunks: Sequence, tokens: torch.Tensor, micro_batch_size: int, output_fn: Callable,
                     extra: Optional[dict] = None, per_token: bool = False, *, inference_context=None,
                     position_offset: int = 0, recorder=None) -> Optional[torch.Tensor]:
    """``output_fn(logits, micro_batch)`` of every micro-batch of ``tokens``, concatenated over rows.

    Args:
        chunks: the model chunks (DDP-wrapped or bare ``GPTModel``).
        tokens: ``[R, S]`` int64 inputs; ``R`` a multiple of ``micro_batch_size`` times
            :func:`microbatch_multiple` (the caller pads).
        output_fn: maps the last stage's ``[b, s, V / tp]`` vocab-parallel logits and the micro-batch dict
            (``tokens``, ``position_ids`` and the row slices of ``extra``) to a ``[b, ...]`` tensor. Under
            CP, ``s = S / CP``: ``tokens``, ``position_ids`` (the global positions of the shard) and every
            ``[R, S]`` entry of ``extra`` are this CP rank's zigzag shard.
        extra: more ``[R, ...]`` tensors to slice into the micro-batches.
        per_token: ``output_fn`` returns ``[b, s, ...]`` per-token values; under CP they are gathered over
            the CP group (one all-gather per micro-batch) into ``[b, S, ...]`` full rows.
        inference_context: a Megatron ``StaticInferenceContext`` for ``R`` rows (KV-cached decoding):
            passed to the model, with ``batch_size_offset`` set to each micro-batch's first row; the
            caller advances its ``sequence_len_offset``. The chunks must be in eval mode. The last
            stage's logits are then the full vocabulary of the last position only, ``[b, 1, V]``.
        position_offset: position id of ``tokens[:, 0]`` (the cached tokens precede it).
        recorder: a :class:`megatron_rl_agg.mcore.routing_replay.RouteRecorder` that records the MoE
            routes of every micro-batch (R2), or None.

    Returns:
        ``[R, ...]`` on the last pipeline stage, None on the other stages.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rl_agg.mcore.cpu_mode import device

    dev = device()
    tokens = tokens.to(dev)
    extra = {k: v.to(dev) for k, v in (extra or {}).items()}
    num_rows, seq = tokens.shape
    num_mb = num_rows // micro_batch_size
    if num_mb * micro_batch_size != num_rows or num_mb % microbatch_multiple():
        raise ValueError(f"{num_rows} rows do not split into micro-batches of {micro_batch_size} rows whose "
                         f"count is a multiple of {microbatch_multiple()}")
    positions = torch.arange(position_offset, position_offset + seq, device=tokens.device)
    positions = positions.unsqueeze(0).expand(num_rows, seq)
    columns = {"tokens": tokens, "position_ids": positions, **extra}
    cp_group, cp_size, cp_rank = compat.parallel_group("cp")
    if cp_size > 1:
        if inference_context is not None:
            raise ValueError(f"KV-cached decoding (inference_context) needs context_parallel_size 1, got "
                             f"{cp_size}: Megatron's static KV cache holds whole sequences")
        columns = {k: split_for_cp_rank(v, cp_size, cp_rank, dim=1)
                   if v.dim() >= 2 and v.shape[1] == seq else v for k, v in columns.items()}
    micro_batches = [{**{k: v[i * micro_batch_size:(i + 1) * micro_batch_size] for k, v in columns.items()},
                      "row_offset": i * micro_batch_size} for i in range(num_mb)]
    if per_token and cp_size > 1:
        inner = output_fn

        def output_fn(logits, micro_batch):      # [b, s, ...] shard -> [b, S, ...] full rows
            return merge_cp_shards(dist.all_gather_stacked(inner(logits, micro_batch), cp_group), dim=1)

    chunk_list = list(chunks)
    reports = get_forward_backward_func()(
        forward_step_func=functools.partial(_forward_step, output_fn=output_fn,
                                            inference_context=inference_context, recorder=recorder),
        # interleaved schedules take one iterator per virtual stage, each reading every micro-batch
        data_iterator=[iter(micro_batches) for _ in chunk_list] if len(chunk_list) > 1
        else iter(micro_batches),
        model=chunk_list, num_microbatches=num_mb, seq_length=seq, micro_batch_size=micro_batch_size,
        forward_only=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat([r["rows"] for r in reports], dim=0)


def broadcast_from_last_stage(value: Optional[torch.Tensor], shape, dtype) -> torch.Tensor:
    """The last pipeline stage's ``value`` on every stage (other stages pass None).

    A sum over the pipeline group in which every stage but the last contributes zeros: ``x + 0 == x``
    exactly, for floats and integers, so this is a broadcast built from the one collective kind
    :mod:`megatron_rl_agg.parallel.dist` already has. Each pipeline group holds one rank per stage (same TP and DP
    rank), and TP ranks of the last stage hold identical values, so every rank ends with the same tensor.
    """
    from megatron.core import parallel_state

    from megatron_rl_agg.mcore.cpu_mode import device

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    value = torch.zeros(shape, dtype=dtype, device=device()) if value is None else value.to(device())
    return dist.all_reduce_sum(value, parallel_state.get_pipeline_model_parallel_group())


def _label_logprobs(logits: torch.Tensor, micro_batch: dict, *, temperature: float) -> torch.Tensor:
    # vocab_parallel_cross_entropy normalizes its input in place; the logits are not reused after this.
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature        # the division of the sampler and of the loss's kernel
    return vocab_parallel_logprobs(logits, micro_batch["labels"])


def compute_logprobs(chunks: Sequence, tokens: torch.Tensor, labels: torch.Tensor,
                     micro_batch_size: int, *, temperature: float, record_routes: bool = False):
    """``[R, S]`` float32 log-probs ``log softmax(z / T)[label]`` of ``labels`` under the model, on every
    pipeline stage.

    Used for the frozen reference policy and for behaviour log-probs an offline file does not carry;
    values at masked positions are meaningless and are ignored by the loss. ``temperature`` (required, no
    default: a forgotten one would silently give log-probs of another distribution) is the sampling
    temperature ``T`` (``LossConfig.temperature``): the loss computes its log-probs from ``z / T`` too, so a
    recorded on-policy log-prob equals the loss's (ratio exactly 1).

    ``record_routes=True`` (MoE routing replay R2, :mod:`megatron_rl_agg.mcore.routing_replay`; the model
    built with ``moe_enable_routing_replay=True``) also records the expert indices every MoE router chose
    and returns ``(logprobs, routes)``, ``routes [R, S, L, k]`` int64 on every rank.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    from megatron_rl_agg.mcore import routing_replay

    context = (routing_replay.recording(list(chunks), tokens.shape[0], tokens.shape[1]) if record_routes
               else contextlib.nullcontext())
    with context as recorder:
        out = run_forward_only(chunks, tokens, micro_batch_size,
                               functools.partial(_label_logprobs, temperature=float(temperature)),
                               extra={"labels": labels}, per_token=True, recorder=recorder)
        logprobs = broadcast_from_last_stage(out, tuple(tokens.shape), torch.float32)
        return (logprobs, recorder.routes()) if record_routes else logprobs
