"""Layout-independent weights and full gradients of Megatron-Core GPT chunks.

The global key of a parameter is its Megatron dist-checkpointing key; transformer layers are stacked
along a leading layer axis, so ``grads["decoder.layers.mlp.linear_fc1.weight"]`` is
``[num_layers, ffn, hidden]`` whatever the layout. :func:`init_weights` gives every layout the same full
weights (a function of ``(seed, global key)`` only) and :func:`gather_full_grads` /
:func:`gather_full_params` assemble full tensors on every rank, so gradients and weights from different
layouts are directly comparable. :func:`stage_full_params` is the export's streaming form: one pipeline
stage's full tensors, one at a time, gathered over tensor parallelism only.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from megatron_rl_agg.core.seeds import seeded_generator
from megatron_rl_agg.mcore.build import unwrap

__all__ = ["init_weights", "gather_full_grads", "gather_full_params", "stage_full_params"]


def _flat_sharded_tensors(model):
    """Every ``ShardedTensor`` of ``model.sharded_state_dict()``, factories built into their parts."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = []
    stack = [model.sharded_state_dict()]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, ShardedTensorFactory):
            stack.append(item.build())
        elif isinstance(item, ShardedTensor):
            out.append(item)
    return out


def _param_shards(chunks):
    """``(param, ShardedTensor)`` pairs for every parameter view in the chunks' sharded state.

    A ShardedTensor's ``data`` is a parameter or a view of one (the gated MLP's fc1 is split into
    its two halves); each is matched to the parameter sharing its storage. Raises if a parameter
    is not covered exactly once, so an unknown sharding scheme cannot go unnoticed.
    """
    pairs = []
    for chunk in chunks:
        model = unwrap(chunk)
        named = list(model.named_parameters())
        covered = {id(p): 0 for _, p in named}
        for sh in _flat_sharded_tensors(model):
            if sh.data is None or sh.flattened_range is not None:
                continue
            param = _owning_param(sh.data, named)
            if param is None:
                continue
            covered[id(param)] += sh.data.numel()
            pairs.append((param, sh))
        bad = [name for name, p in named if covered[id(p)] != p.numel()]
        if bad:
            raise RuntimeError(f"sharded_state_dict does not cover these parameters exactly once: {bad}")
    return pairs


def _owning_param(view: torch.Tensor, named: list):
    """The parameter whose memory contains ``view`` (parameters may share one flat buffer)."""
    start = view.data_ptr()
    storage = view.untyped_storage().data_ptr()
    for _, param in named:
        begin = param.data_ptr()
        end = begin + param.numel() * param.element_size()
        if param.untyped_storage().data_ptr() == storage and begin <= start < end:
            return param
    return None


def _full_init(key: str, layer: tuple[int, ...], shape: tuple[int, ...], seed: int, std: float,
               num_layers: int) -> torch.Tensor:
    """Deterministic full (unsharded) fp32 value of global key ``key`` at stacked-layer index ``layer``.

    Megatron's default init: biases 0, norm weights 1, other weights N(0, std), where the residual
    output projections (attention ``linear_proj``, MLP ``linear_fc2``) use std / sqrt(2 * num_layers)
    like ``scaled_init_method_normal``. The random stream is seeded from ``(seed, key, layer)`` only.
    """
    if key.endswith("bias"):
        return torch.zeros(shape)
    parts = key.split(".")
    name, module = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if "norm" in name or "norm" in module:  # final_layernorm.weight, linear_qkv.layer_norm_weight
        return torch.ones(shape)
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / (2.0 * num_layers) ** 0.5
    gen = seeded_generator(seed, f"{key}{list(layer)}")
    return torch.randn(shape, generator=gen) * std


@torch.no_grad()
def init_weights(chunks: list, seed: int) -> None:
    """Overwrite every parameter with a value that depends on ``(seed, global key)`` only.

    For each parameter shard the full tensor of its global key is generated (per layer for
    stacked layer keys, so a pipeline stage only generates its own layers) and the local slice
    (``ShardedTensor.global_slice()``) is copied in. Tied embedding copies share a key and so get
    equal values. Call before :func:`build_optimizer` (mixed-precision optimizers copy the
    parameters into fp32 main weights when built).
    """
    config = unwrap(chunks[0]).config
    for _, sh in _param_shards(chunks):
        prepend = sh.prepend_axis_num
        full = _full_init(sh.key, tuple(sh.global_offset[:prepend]), tuple(sh.global_shape[prepend:]),
                          seed, config.init_method_std, config.num_layers)
        local = full[sh.global_slice()[prepend:]]
        sh.data.copy_(local.reshape(sh.data.shape))


def _gather_full(chunks: list, read: Callable, check_replicas: bool) -> dict[str, torch.Tensor]:
    """All-gather ``read(param, shard) -> (value, valid)`` over the world and assemble full tensors.

    ``valid`` (bool, shard-shaped, or None for all) marks the elements this rank holds correctly.
    Every element must be valid on at least one rank; where several ranks hold it (DP replicas,
    TP-duplicated norms, the tied output-layer copy) the copies must agree if ``check_replicas``.
    """
    import torch.distributed as torch_dist

    local = []
    for param, sh in _param_shards(chunks):
        value, valid = read(param, sh)
        if valid is None:
            valid = torch.ones(value.shape, dtype=torch.bool)
        if bool(valid.any()):
            local.append((sh.key, tuple(sh.global_shape), sh.global_slice(),
                          value.detach().float().cpu().clone(), valid.cpu().clone()))
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        gathered = [None] * torch_dist.get_world_size()
        torch_dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    full, written = {}, {}
    for key, shape, index, value, valid in (entry for rank_entries in gathered for entry in rank_entries):
        if key not in full:
            full[key] = torch.zeros(shape)
            written[key] = torch.zeros(shape, dtype=torch.bool)
        target, seen = full[key][index], written[key][index]
        value, valid = value.reshape(target.shape), valid.reshape(target.shape)
        both = seen & valid
        if check_replicas and bool(both.any()):
            prev = target[both]
            diff = (prev - value[both]).abs().max().item()
            scale = max(prev.abs().max().item(), 1e-30)
            if diff > 1e-6 * scale:
                raise RuntimeError(
                    f"replicas of {key!r} disagree: max abs diff {diff:.3e} (scale {scale:.3e})")
        target[valid] = value[valid]
        seen[valid] = True
    missing = [key for key, seen in written.items() if not bool(seen.all())]
    if missing:
        raise RuntimeError(f"no rank holds part of these tensors: {missing}")
    return full


def _view_like(tensor: torch.Tensor, param: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` (shaped and laid out like ``param``) that ``view`` is of ``param``."""
    offset = view.storage_offset() - param.storage_offset()
    return tensor.as_strided(view.shape, view.stride(), tensor.storage_offset() + offset)


def _reduced_grad_masks(chunks: list) -> dict[int, torch.Tensor]:
    """Per parameter (by id), which ``main_grad`` elements hold the DP-reduced gradient.

    Only needed with the distributed optimizer: its reduce-scatter leaves each DP rank the reduced
    values of one contiguous shard of every bucket (``shard_buffer``), the rest stays local.
    """
    masks = {}
    for chunk in chunks:
        groups = getattr(chunk, "bucket_groups", []) + getattr(chunk, "expert_parallel_bucket_groups", [])
        for group in groups:
            if not group.ddp_config.use_distributed_optimizer:
                continue
            size = group.intra_distributed_optimizer_instance_size
            rank = group.intra_distributed_optimizer_instance_rank
            for bucket in group.buckets:
                shard = bucket.grad_data.numel() // size
                lo, hi = rank * shard, (rank + 1) * shard
                for param in bucket.params_list:
                    # main_grad is a view of the bucket's grad_data (params are padded apart).
                    start = param.main_grad.storage_offset() - bucket.grad_data.storage_offset()
                    mask = torch.zeros(param.numel(), dtype=torch.bool)
                    mask[max(lo - start, 0):max(min(hi - start, param.numel()), 0)] = True
                    masks[id(param)] = mask.view(param.shape)
    return masks


def gather_full_grads(chunks: list, *, check_replicas: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 gradient, keyed by global key, on every rank.

    Reads the DDP ``main_grad`` buffers (``param.grad`` for unwrapped chunks), so call it after the
    schedule has run ``finalize_model_grads`` (DP all-reduce or, with the distributed optimizer,
    reduce-scatter; tied-embedding sync) and before the optimizer step. With the distributed
    optimizer each element is taken from the DP rank whose shard holds it reduced. One
    ``all_gather_object`` over the world; a test/audit utility, not a hot path.

    Args:
        check_replicas: raise if copies of one element held by several ranks (DP replicas,
            TP-duplicated norms, the tied output-layer copy) differ by more than 1e-6 relative.
    """
    masks = _reduced_grad_masks(chunks)

    def read(param, sh):
        grad = getattr(param, "main_grad", None)
        grad = param.grad if grad is None else grad
        if grad is None:
            return torch.zeros(sh.data.shape), None
        mask = masks.get(id(param))
        return _view_like(grad, param, sh.data), None if mask is None else _view_like(mask, param, sh.data)

    return _gather_full(chunks, read, check_replicas)


def gather_full_params(chunks: list, *, check_replicas: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter's full value (as fp32), keyed by global key, on every rank."""
    return _gather_full(chunks, lambda param, sh: (sh.data, None), check_replicas)


def _is_main_replica(sh) -> bool:
    """Megatron dist-checkpointing's rule: the copy a checkpoint saves has every ``replica_id`` part 0
    (not a TP-duplicated norm on TP rank > 0, not the last stage's tied output-layer copy, DP rank 0)."""
    rid = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
    return all(int(r) == 0 for r in rid)


@torch.no_grad()
def stage_full_params(chunks: list, tp_group=None) -> Iterator[tuple[str, Optional[int], torch.Tensor]]:
    """``(global key, layer or None, full fp32 tensor)`` of this pipeline stage's parameters, one at a time,
    on TP rank 0 of ``tp_group`` (the other TP ranks take part in the gathers and yield nothing).

    Call on every rank of one tensor-parallel group (one pipeline stage of one DP x CP replica; the
    export calls it on DP x CP rank 0 only). Only main replicas count (:func:`_is_main_replica`), so
    every tensor of the model is yielded exactly once over the stages of a replica: a TP-split tensor
    after one ``gather_to_first`` of the shards' values over ``tp_group`` (only TP rank 0 receives) (the pieces are placed by
    their global offsets), a replicated one as TP rank 0 holds it (no collective). ``layer`` is the global layer index of stacked ``decoder.layers.*`` keys. The values
    are the parameters' own (``sh.data``) cast to fp32 on the host, as :func:`gather_full_params`.
    A rank holds its stage plus one gathered tensor (its ``W`` shards and the assembled copy) at a time.

    One ``all_gather_objects`` of the shard layout first checks that the TP ranks agree on the
    sequence of TP-split tensors and their sizes (raises otherwise, on every rank, before any gather).
    """
    from megatron_rl_agg.parallel import dist

    groups: dict[tuple, list] = {}
    for _, sh in _param_shards(chunks):
        if not _is_main_replica(sh):
            continue
        prepend = sh.prepend_axis_num
        groups.setdefault((sh.key, tuple(sh.global_offset[:prepend])), []).append(sh)
    split, layout = [], []
    for (key, layer), shards in groups.items():
        sh0 = shards[0]
        frag = 1
        for f in sh0.axis_fragmentations[sh0.prepend_axis_num:]:
            frag *= int(f)
        if frag > 1:
            split.append((key, layer))
            layout.append((key, layer, tuple(sh0.global_shape[sh0.prepend_axis_num:]),
                           [(tuple(sh.global_offset[sh.prepend_axis_num:]), tuple(sh.data.shape)) for sh in shards]))
    everyone = dist.all_gather_objects(layout, tp_group)
    signature = [[(k, lay, shape, sum(_numel(s) for _, s in pieces)) for k, lay, shape, pieces in rank_layout]
                 for rank_layout in everyone]
    if any(sig != signature[0] for sig in signature):
        raise RuntimeError("tensor-parallel ranks disagree on the TP-split tensors of their stage "
                           f"(key, layer, shape, local elements per rank): {signature}")
    split_set = set(split)
    tp_rank = dist.rank(tp_group)
    for (key, layer), shards in groups.items():
        layer_index = layer[0] if layer else None
        if (key, layer) not in split_set:
            if len(shards) != 1:
                raise RuntimeError(f"{key!r} (layer {layer_index}) has {len(shards)} unsplit parts on one rank")
            if tp_rank == 0:
                sh = shards[0]
                yield key, layer_index, sh.data.detach().float().cpu().reshape(
                    tuple(sh.global_shape[sh.prepend_axis_num:])).clone()
            continue
        flat = torch.cat([sh.data.detach().reshape(-1) for sh in shards])
        gathered = dist.gather_to_first(flat, tp_group)                 # [W, local elements] on TP rank 0
        del flat
        if gathered is None:
            continue
        position = split.index((key, layer))
        shape = everyone[0][position][2]
        full = torch.empty(shape)
        placed = 0
        for rank_layout, values in zip(everyone, gathered):
            start = 0
            for offset, piece_shape in rank_layout[position][3]:
                if len(piece_shape) != len(shape):
                    raise RuntimeError(f"a shard {piece_shape} of {key!r} does not match its tensor's rank {shape}")
                n = _numel(piece_shape)
                full[tuple(slice(o, o + s) for o, s in zip(offset, piece_shape))] = \
                    values[start:start + n].reshape(piece_shape)            # cast to fp32 on the copy
                start += n
                placed += n
        if placed != full.numel():        # Megatron's shards tile the tensor without overlap
            raise RuntimeError(f"the TP shards of {key!r} (layer {layer_index}) hold {placed} of its "
                               f"{full.numel()} elements")
        del gathered                                  # only the assembled tensor is alive while it is used
        yield key, layer_index, full
        del full


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n

