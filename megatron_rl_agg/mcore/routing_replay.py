"""MoE routing replay (R2 / R3) through Megatron-Core's ``RouterReplay``, with routes sliced like tokens.

An MoE policy may route a token to other experts in the pass that sampled it, in the old-log-prob pass
and in the update, so the importance ratio is noisy even on-policy. Routing replay fixes the update's
expert choice (the paper-level variants of verl / slime / NeMo-RL, "R2" and "R3"):

* ``r2``: the routes of the proximal / old log-prob forward (:func:`megatron_rl_agg.mcore.forward.
  compute_logprobs` with ``record_routes=True``) are replayed in every micro-batch of the update;
* ``r3``: the routes the rollout engine used (an offline rollout file's ``routes``) are replayed.

Megatron-Core's router (``moe_enable_routing_replay=True``) owns one ``RouterReplay`` per MoE layer; in
``REPLAY_FORWARD`` / ``REPLAY_BACKWARD`` it takes the top-k expert INDICES given and recomputes their
probabilities from the live router scores (``probs = scores.gather(1, idx)``), so the router keeps its
gradient. This module never touches Megatron's global instance list: it finds the routers of the model
chunks it is given.

The route tensor (the one canonical form, per data-parallel rank): ``routes [R, S, L, k]`` int64, the
expert indices of token ``s`` of row ``r`` at MoE layer ``l`` (``L`` MoE layers of the WHOLE model in
layer order, ``k = moe_router_topk``). It is a per-token tensor like ``tokens``: ``prepare_microbatches``
slices it into micro-batches, pads rows, cuts the zigzag CP shard along ``S`` and packing moves it with
its tokens. At the router, this module then

* keeps only the MoE layers of the model chunk (pipeline stage / virtual stage) being run,
* cuts this tensor-parallel rank's sequence-parallel shard (the router sees ``[S / (C * TP), b]``),
* flattens SEQUENCE-FIRST (``[s, b, k] -> [s * b, k]``), the order of the router's ``logits.view(-1, E)``
  (a batch-first flattening misaligns every row but the first: miles #3146).

Tokens that have no route of their own (rows added to pad a micro-batch, the filler tokens of a packed
sequence) replay the experts ``0 .. k-1``: valid, distinct indices; they carry no loss weight, and the padding mask keeps them out of Megatron's
aux-loss statistics with and without replay (:mod:`megatron_rl_agg.mcore.moe_padding`).

Backward under activation recompute: ``set_target_indices`` appends each micro-batch's routes to the
layer's FIFO, and the output of every replayed forward carries a gradient hook that switches
that chunk's routers to ``REPLAY_BACKWARD``, so the recomputed forward pops the routes of the micro-batch
being back-propagated (each chunk runs its micro-batches' backwards in forward order under 1F1B and the
interleaved schedule, so FIFO order holds per layer).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

from megatron_rl_agg.core.context_parallel import merge_cp_shards
from megatron_rl_agg.core.routing import REPLAY_MODES, get_replay_mode
from megatron_rl_agg.mcore import compat
from megatron_rl_agg.parallel import dist

__all__ = ["REPLAY_MODES", "get_replay_mode", "moe_layer_numbers", "chunk_routers", "RouteRecorder", "recording",
           "MismatchCounter",
           "set_replay", "mark_backward", "clear", "check_routes", "padding_routes", "routes_of_map"]

def moe_layer_numbers(config) -> list[int]:
    """Global 1-based layer numbers of the MoE layers, in order (Megatron's ``moe_layer_freq`` pattern:
    an int ``f`` makes layer ``i`` (0-based) MoE when ``i % f == 0``; a list gives 1 / 0 per layer)."""
    freq = getattr(config, "moe_layer_freq", 1)
    if isinstance(freq, int):
        pattern = [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    else:
        pattern = list(freq)
    return [i + 1 for i, moe in enumerate(pattern) if moe]


def _unwrap(chunk):
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def chunk_routers(chunk) -> list[tuple[int, object]]:
    """``[(moe_index, RouterReplay)]`` of the MoE routers in ``chunk``, ``moe_index`` the layer's position
    in :func:`moe_layer_numbers` (the ``L`` axis of ``routes``).

    Raises:
        ValueError: a router has no ``RouterReplay`` (the model was built without
            ``moe_enable_routing_replay=True``) or the chunk holds no MoE layer at all while the model has
            some (never raised for a stage without MoE layers of a model that has them elsewhere).
    """
    from megatron.core.utils import get_model_config

    config = get_model_config(chunk)
    numbers = moe_layer_numbers(config)
    found = []
    for module in _unwrap(chunk).modules():
        if not hasattr(module, "router_replay") or not hasattr(module, "layer_number"):
            continue
        if module.router_replay is None:
            raise ValueError("MoE routing replay needs a model built with moe_enable_routing_replay=True "
                             "(build_model(spec, moe_enable_routing_replay=True)); this router has none")
        if module.layer_number not in numbers:
            raise ValueError(f"router of layer {module.layer_number} is not an MoE layer of the pattern "
                             f"{numbers}")
        found.append((numbers.index(module.layer_number), module.router_replay))
    return sorted(found, key=lambda pair: pair[0])


def _sp_group(config):
    """``(group, size, rank)`` of the TP group when the router sees a sequence-parallel shard."""
    group, size, rank = compat.parallel_group("tp")
    if size > 1 and not config.sequence_parallel:
        raise ValueError(f"MoE routing replay at tensor_model_parallel_size={size} needs sequence_parallel="
                         "True (Megatron routes the sequence-parallel shard of each TP rank)")
    return group, size, rank


def _routers_by_chunk(chunks) -> dict[int, list]:
    return {id(chunk): chunk_routers(chunk) for chunk in chunks}


def padding_routes(shape: Sequence[int], topk: int, device=None) -> torch.Tensor:
    """``[*shape, k]`` int64 routes ``0 .. k-1`` for tokens with no route of their own."""
    return torch.arange(topk, device=device).expand(*shape, topk).clone()


def routes_of_map(routing_map: torch.Tensor, topk: int) -> torch.Tensor:
    """Sorted expert indices ``[N, k]`` of a router's boolean ``routing_map [N, E]`` (exactly ``k`` per
    token; raises otherwise): what a test compares with the routes given."""
    counts = routing_map.sum(-1)
    if not bool((counts == topk).all()):
        raise ValueError(f"routing map rows select {sorted(set(counts.tolist()))} experts, expected {topk}")
    return routing_map.nonzero()[:, 1].view(-1, topk)


class RouteRecorder:
    """Records the routes of a forward-only pass (R2) into ``routes [R, S, L, k]``.

    Use through :func:`megatron_rl_agg.mcore.forward.compute_logprobs` ``(..., record_routes=True)``: the
    forward step calls :meth:`before` (routers of the chunk to ``RECORD``) and :meth:`after` (reads each
    router's ``[s * b, k]`` indices of the micro-batch, un-flattens them sequence-first, gathers the
    sequence-parallel shards over TP); :meth:`routes` then gathers the zigzag CP shards and sums the
    stages' disjoint layers over the pipeline group, so every rank holds the full ``[R, S, L, k]``.
    """

    def __init__(self, chunks, num_rows: int, seq_length: int):
        from megatron.core.utils import get_model_config

        self.config = get_model_config(chunks[0])
        self.layers = len(moe_layer_numbers(self.config))
        self.topk = int(self.config.moe_router_topk)
        self.routers = _routers_by_chunk(chunks)
        _, cp_size, _ = compat.parallel_group("cp")
        self.seq_length = seq_length
        self.buffer = torch.zeros(num_rows, seq_length // cp_size, self.layers, self.topk, dtype=torch.int64)

    def before(self, model) -> None:
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        for _, replay in self.routers[id(model)]:
            replay.clear_indices()
            replay.set_router_replay_action(RouterReplayAction.RECORD)

    def after(self, model, micro_batch: dict) -> None:
        group, tp_size, _ = _sp_group(self.config)
        rows = micro_batch["tokens"].shape[0]
        offset = micro_batch["row_offset"]
        for index, replay in self.routers[id(model)]:
            idx = replay.get_recorded_indices()
            replay.clear_indices()
            replay.clear_router_replay_action()
            if idx is None:
                raise RuntimeError(f"MoE layer {index} recorded no routes in this forward")
            local = idx.to(torch.int64).reshape(-1, rows, self.topk)     # [s_local, b, k] sequence-first
            if tp_size > 1:
                local = torch.cat(list(dist.all_gather_stacked(local.contiguous(), group).unbind(0)), dim=0)
            self.buffer[offset:offset + rows, :, index] = local.transpose(0, 1).cpu()

    def routes(self) -> torch.Tensor:
        """``[R, S, L, k]`` int64 on every rank (collectives over the CP and pipeline groups)."""
        from megatron.core import parallel_state

        from megatron_rl_agg.mcore.cpu_mode import device

        routes = self.buffer.to(device())
        cp_group, cp_size, _ = compat.parallel_group("cp")
        if cp_size > 1:
            routes = merge_cp_shards(dist.all_gather_stacked(routes.contiguous(), cp_group), dim=1)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            routes = dist.all_reduce_sum(routes, parallel_state.get_pipeline_model_parallel_group())
        return routes


@contextlib.contextmanager
def recording(chunks, num_rows: int, seq_length: int) -> Iterator[RouteRecorder]:
    recorder = RouteRecorder(chunks, num_rows, seq_length)
    try:
        yield recorder
    finally:
        clear(chunks)


def set_replay(model, routes: torch.Tensor, *, num_real_tokens: Optional[int] = None) -> None:
    """Give the routers of ``model`` (one chunk) this micro-batch's routes and switch them to
    ``REPLAY_FORWARD``.

    Args:
        routes: ``[b, s, L, k]`` int64, the micro-batch's routes as ``prepare_microbatches`` sliced them
            (``s = S / C`` under CP; ``[1, T, L, k]`` for a packed micro-batch).
        num_real_tokens: a packed micro-batch's real tokens: positions at and after it are filler and
            replay :func:`padding_routes`.
    """
    from megatron.core.transformer.moe.router_replay import RouterReplayAction
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    group, tp_size, tp_rank = _sp_group(config)
    topk = int(config.moe_router_topk)
    if routes.dim() != 4 or routes.shape[-1] != topk:
        raise ValueError(f"micro-batch routes must be [b, s, L, k={topk}], got {tuple(routes.shape)}")
    if num_real_tokens is not None and num_real_tokens < routes.shape[1]:
        routes = routes.clone()
        routes[:, num_real_tokens:] = padding_routes(routes[:, num_real_tokens:].shape[:-1], topk,
                                                     routes.device)
    seq_first = routes.transpose(0, 1)                                  # [s, b, L, k]
    if tp_size > 1:
        seq_first = seq_first.chunk(tp_size, dim=0)[tp_rank]
    for index, replay in chunk_routers(model):
        replay.clear_router_replay_action()
        replay.set_target_indices(seq_first[:, :, index].reshape(-1, topk).contiguous())
        replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


def mark_backward(model, output: torch.Tensor) -> torch.Tensor:
    """``output`` of a replayed forward, with a gradient hook that switches the chunk's routers to
    ``REPLAY_BACKWARD`` when back-propagation reaches it (before any recomputed forward of the chunk)."""
    if not output.requires_grad:
        return output
    replays = [replay for _, replay in chunk_routers(model)]

    def to_backward(grad):
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        for replay in replays:
            replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)

    output.register_hook(to_backward)
    return output


def clear(chunks) -> None:
    """Drop every route and action of the chunks' routers (call after the update's schedule)."""
    for chunk in chunks:
        for _, replay in chunk_routers(chunk):
            replay.clear_indices()
            replay.clear_router_replay_action()


def check_routes(routes: torch.Tensor, num_rows: int, seq_length: int, num_layers: int, topk: int,
                 num_experts: int, *, what: str = "routes") -> None:
    """Raise a ValueError naming the first problem of ``routes`` (shape ``[R, S, L, k]``, integer, every
    index in ``[0, num_experts)``, the ``k`` experts of a token distinct); one host read per mini-batch."""
    want = (num_rows, seq_length, num_layers, topk)
    if routes.dtype.is_floating_point or routes.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer expert indices, got dtype {routes.dtype}")
    if tuple(routes.shape) != want:
        raise ValueError(f"{what} must be [rows, seq, moe_layers, topk] = {list(want)}, got {list(routes.shape)}")
    if routes.numel() == 0:
        return
    bad = (routes < 0) | (routes >= num_experts)
    if bool(bad.any()):
        pos = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(f"{what}[{pos[0]}, {pos[1]}, {pos[2]}] holds expert {int(routes[tuple(pos)])}, "
                         f"outside [0, {num_experts}) (num_experts={num_experts})")
    if topk > 1:
        ordered = routes.sort(-1).values
        dup = (ordered[..., 1:] == ordered[..., :-1]).any(-1)
        if bool(dup.any()):
            pos = [int(i) for i in dup.nonzero()[0]]
            raise ValueError(f"{what}[{pos[0]}, {pos[1]}, {pos[2]}] repeats an expert "
                             f"({routes[tuple(pos)].tolist()}): the top-{topk} experts of a token must differ")


class MismatchCounter:
    """The routing-mismatch metric of a replayed update: per MoE layer, the fraction of routed tokens whose
    replayed top-k set differs from the one the live router would choose in the same forward
    (``topk(logits)``, or ``topk(score(logits) + expert_bias)`` with an expert bias), i.e. the tokens that
    would route elsewhere without replay at that layer. Counted on the device by a forward hook on every
    router (forward calls only: a recomputed forward in backward is not counted twice), summed over all
    ranks by :meth:`fractions` (each token of a layer is routed on exactly one rank: SP / CP shards, DP and
    EP rows, one pipeline stage per layer), so the value is exact over ranks. Padding rows and tokens (the padding mask the router gets)
    are not counted. Group-limited routing (``moe_router_num_groups``) is refused.
    """

    def __init__(self, chunks):
        from megatron.core.utils import get_model_config

        config = get_model_config(chunks[0])
        if getattr(config, "moe_router_num_groups", None):
            raise ValueError("the routing-mismatch metric does not cover group-limited routing "
                             f"(moe_router_num_groups={config.moe_router_num_groups})")
        numbers = moe_layer_numbers(config)
        self.topk = int(config.moe_router_topk)
        self.score = getattr(config, "moe_router_score_function", "softmax")
        self.counts = None
        self.layers = len(numbers)
        self.handles = []
        for chunk in chunks:
            for module in _unwrap(chunk).modules():
                if getattr(module, "router_replay", None) is not None:
                    self.handles.append(module.register_forward_hook(self._hook(numbers.index(module.layer_number))))

    def _hook(self, index):
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        def hook(module, inputs, output):
            if module.router_replay.router_replay_action != RouterReplayAction.REPLAY_FORWARD:
                return
            with torch.no_grad():
                logits = module.gating(inputs[0]).view(-1, output[1].shape[-1]).float()
                scores = logits
                if getattr(module, "expert_bias", None) is not None:
                    base = torch.sigmoid(logits) if self.score == "sigmoid" else torch.softmax(logits, -1)
                    scores = base + module.expert_bias
                live = torch.zeros_like(output[1]).scatter_(1, scores.topk(self.topk, dim=-1).indices, True)
                differs = (live != output[1]).any(-1)
                # the router's padding mask ([s, b], True = padding; mcore.moe_padding), flattened like logits
                mask = inputs[1] if len(inputs) > 1 else None
                real = torch.ones_like(differs) if mask is None else ~mask.reshape(-1).bool()
                if self.counts is None:
                    self.counts = torch.zeros(self.layers, 2, dtype=torch.float64, device=logits.device)
                self.counts[index, 0] += (differs & real).sum()
                self.counts[index, 1] += real.sum()
        return hook

    def fractions(self) -> list[float]:
        """Per MoE layer, mismatched / routed tokens over all ranks (one all-reduce; 0.0 for no token)."""
        from megatron_rl_agg.mcore.cpu_mode import device

        counts = self.counts if self.counts is not None else torch.zeros(self.layers, 2, dtype=torch.float64,
                                                                          device=device())
        counts = dist.all_reduce_sum(counts.clone(), dist.world_group())
        self.counts = None
        return (counts[:, 0] / counts[:, 1].clamp(min=1)).tolist()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
