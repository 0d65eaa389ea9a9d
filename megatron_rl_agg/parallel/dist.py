"""The only module that calls ``torch.distributed``.

Every collective the plugin issues goes through one of the small wrappers below, so the number of
collectives per optimizer step is easy to audit. ``group=None`` (or an uninitialised process group)
means "this process is the whole world": every wrapper then returns its input unchanged and issues
no collective.

Traffic counter: inside ``with count_collectives() as c:`` every wrapper that communicates adds to ``c``,
keyed by its name, one call per ``torch.distributed`` collective and the *payload*: the size in bytes of
the collective's result on this rank: ``tensor.nbytes`` for an all-reduce, ``W * rows.nbytes`` for an
all-gather over ``W`` ranks (the varlen gather: ``8 W`` bytes of row counts plus ``W`` times the padded
rows). What a ring algorithm sends per rank is ``2 (W - 1) / W`` (all-reduce) or ``(W - 1) / W``
(all-gather) of that. Wrappers that issue nothing (one rank, no group) record nothing.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as torch_dist

__all__ = ["world_size", "rank", "all_reduce_sum", "all_reduce_max", "all_gather_varlen", "all_gather_fixed",
           "all_gather_stacked", "all_gather_objects", "gather_to_first", "world_group", "barrier",
           "unresponsive_ranks", "CollectiveTraffic",
           "count_collectives", "all_reduce_sum_differentiable", "broadcast_object"]


@dataclass
class CollectiveTraffic:
    """Calls and payload bytes per wrapper name, recorded while a :func:`count_collectives` block runs."""

    calls: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int, calls: int = 1) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + calls
        self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


_COUNTERS: list[CollectiveTraffic] = []


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveTraffic]:
    """Record every collective the wrappers issue inside the block (nested blocks each see all of them)."""
    traffic = CollectiveTraffic()
    _COUNTERS.append(traffic)
    try:
        yield traffic
    finally:
        _COUNTERS.remove(traffic)


def _record(kind: str, nbytes: int, calls: int = 1) -> None:
    for traffic in _COUNTERS:
        traffic.add(kind, nbytes, calls)


def _active(group) -> bool:
    return group is not None and torch_dist.is_available() and torch_dist.is_initialized()


def world_group():
    """The default (world) process group, or None when torch.distributed is not initialised."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.group.WORLD
    return None


def barrier(device="cpu") -> None:
    """Return only when every rank of the world has called it, whatever the layout (DP, CP, TP, PP and EP
    peers alike): one all-reduce of a zero over the default group, a collective like every other, so the
    group's timeout (``--distributed-timeout-minutes``) bounds the wait and a rank that never arrives
    raises as in any collective (see ``trainer/loop/safety.py``). ``device``: the model's (CUDA under
    NCCL). No-op without an initialised world.
    """
    all_reduce_sum(torch.zeros(1, device=device), world_group())


def unresponsive_ranks(tag: str, wait_s: float) -> list[int]:
    """Global ranks that do not check in through the default rendezvous store within ``wait_s`` seconds.

    Every live rank that calls it writes ``tag/<rank>`` and waits for the others' keys; no collective is
    used (it is the tool for when collectives no longer complete). A SIGSTOPped or dead rank never
    writes its key. Returns ``[]`` when there is no store to ask.
    """
    if world_group() is None:
        return []
    try:
        store = torch_dist.distributed_c10d._get_default_store()
        me, size = torch_dist.get_rank(), torch_dist.get_world_size()
        store.set(f"{tag}/{me}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(size) if not store.check([f"{tag}/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except (RuntimeError, AttributeError, ValueError):   # the store itself is gone (its host died)
        return []


def world_size(group=None) -> int:
    """Number of ranks in ``group``; 1 when ``group`` is None or torch.distributed is not initialised."""
    return torch_dist.get_world_size(group) if _active(group) else 1


def rank(group=None) -> int:
    """This process's rank inside ``group``; 0 when ``group`` is None."""
    return torch_dist.get_rank(group) if _active(group) else 0


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over ``group`` (one all-reduce). Returns a new tensor; the input is untouched."""
    if not _active(group) or world_size(group) == 1:
        return tensor
    out = tensor.clone()
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM, group=group)
    _record("all_reduce_sum", out.nbytes)
    return out


def all_reduce_max(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise max of ``tensor`` over ``group`` (one all-reduce)."""
    if not _active(group) or world_size(group) == 1:
        return tensor
    out = tensor.clone()
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.MAX, group=group)
    _record("all_reduce_max", out.nbytes)
    return out


def broadcast_object(obj, src: int = 0, device="cpu"):
    """World rank ``src``'s picklable ``obj`` on every rank of the world (``broadcast_object_list``: a
    size then a byte payload). Used where one rank talks to an outside service (the inference engine)
    and every rank must see the same answer, errors included. The world group's timeout bounds the
    wait. ``device``: the model's (CUDA under NCCL). Without an initialised world: ``obj``.
    """
    group = world_group()
    if group is None or world_size(group) == 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src, group=group,
                                     device=torch.device(device) if device != "cpu" else None)
    _record("broadcast_object", 0)
    return box[0]


def all_gather_varlen(rows: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``rows`` in rank order (two collectives).

    Args:
        rows: ``[n_r, k]`` on rank r; ``n_r`` may differ between ranks (and may be 0), ``k`` and the
            dtype must agree.

    Returns:
        ``[sum_r n_r, k]``, rank 0's rows first. One all-gather exchanges the row counts, a second
        exchanges the rows padded to the longest rank.
    """
    if not _active(group) or world_size(group) == 1:
        return rows
    size = world_size(group)
    n_local = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    counts = [torch.zeros_like(n_local) for _ in range(size)]
    torch_dist.all_gather(counts, n_local, group=group)
    counts_list = [int(c.item()) for c in counts]
    n_max = max(counts_list)
    padded = rows.new_zeros((n_max,) + tuple(rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(size)]
    torch_dist.all_gather(gathered, padded, group=group)
    _record("all_gather_varlen", size * (n_local.nbytes + padded.nbytes), calls=2)
    return torch.cat([g[:c] for g, c in zip(gathered, counts_list)], dim=0)


def all_gather_fixed(rows: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``rows`` in rank order when all ranks send the same shape (one collective).

    Args:
        rows: ``[n, k]`` with the same ``n``, ``k`` and dtype on every rank.

    Returns:
        ``[W * n, k]``, rank 0's rows first.
    """
    if not _active(group) or world_size(group) == 1:
        return rows
    rows = rows.contiguous()
    gathered = [torch.empty_like(rows) for _ in range(world_size(group))]
    torch_dist.all_gather(gathered, rows, group=group)
    _record("all_gather_fixed", len(gathered) * rows.nbytes)
    return torch.cat(gathered, dim=0)
def gather_to_first(tensor: torch.Tensor, group=None):
    """Every rank's ``tensor`` stacked in rank order, ``[W, *tensor.shape]``, on the group's rank 0 only
    (None on the others, which only send): one ``gather``, for large one-off collections such as an
    export's, where the other ranks must not hold the gathered tensor. Shapes and dtypes must agree.
    Not differentiable. Without a group: ``tensor.unsqueeze(0)``."""
    if not _active(group) or world_size(group) == 1:
        return tensor.unsqueeze(0)
    size, first = world_size(group), torch_dist.get_global_rank(group, 0)
    if rank(group) == 0:
        out = tensor.new_empty((size,) + tuple(tensor.shape))
        torch_dist.gather(tensor.contiguous(), gather_list=list(out.unbind(0)), dst=first, group=group)
        _record("gather_to_first", out.nbytes)
        return out
    torch_dist.gather(tensor.contiguous(), gather_list=None, dst=first, group=group)
    _record("gather_to_first", 0)
    return None


def all_gather_objects(obj, group=None) -> list:
    """Every rank's picklable ``obj`` in rank order (one ``all_gather_object``): small metadata only
    (its payload is not counted by the traffic counter). Without a group: ``[obj]``."""
    if not _active(group) or world_size(group) == 1:
        return [obj]
    out = [None] * world_size(group)
    torch_dist.all_gather_object(out, obj, group=group)
    _record("all_gather_objects", 0)
    return out


class _AllGatherStacked(torch.autograd.Function):
    """Forward: ``[C, *shape]`` stack of every rank's ``[*shape]`` tensor (one all-gather).

    Backward: rank ``r``'s input feeds slice ``r`` of the output on EVERY rank, so its gradient is the sum
    over ranks of their output gradients' slice ``r``: one all-reduce of the ``[C, *shape]`` gradient,
    then this rank's slice.
    """

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        size = world_size(group)
        parts = [torch.empty_like(tensor) for _ in range(size)]
        torch_dist.all_gather(parts, tensor.contiguous(), group=group)
        _record("all_gather_stacked", size * tensor.nbytes)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        torch_dist.all_reduce(total, op=torch_dist.ReduceOp.SUM, group=ctx.group)
        _record("all_gather_stacked", total.nbytes)
        return total[rank(ctx.group)], None


def all_gather_stacked(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``tensor`` stacked in rank order, ``[C, *tensor.shape]``, differentiable.

    One all-gather forward; one all-reduce of the output gradient backward (each rank keeps its own
    slice of the summed gradient, which is the exact gradient of its input). Shapes and dtypes must
    agree on all ranks. Without a group: ``tensor.unsqueeze(0)``.
    """
    if not _active(group) or world_size(group) == 1:
        return tensor.unsqueeze(0)
    return _AllGatherStacked.apply(tensor, group)


class _AllReduceSumDifferentiable(torch.autograd.Function):
    """Forward: ``y = sum_r x_r`` on every rank (one all-reduce). Backward: every rank's objective uses
    ``y``, so ``d (sum_r' L_r') / d x_r = sum_r' dL_r' / dy``: one all-reduce of the output gradient."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone()
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM, group=group)
        _record("all_reduce_sum_grad", out.nbytes)
        return out

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        torch_dist.all_reduce(total, op=torch_dist.ReduceOp.SUM, group=ctx.group)
        _record("all_reduce_sum_grad", total.nbytes)
        return total, None


def all_reduce_sum_differentiable(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of ``tensor`` over ``group`` with an autograd-correct backward (the output gradient summed over
    the group): for per-sequence scalars split over context-parallel ranks (e.g. the numerator of a
    sequence's mean log-ratio, ``[b]``), so each rank moves ``b`` numbers, not ``[b, T]`` log-probs.
    Counted as ``all_reduce_sum_grad`` (forward and backward). Without a group: ``tensor`` itself."""
    if not _active(group) or world_size(group) == 1:
        return tensor
    return _AllReduceSumDifferentiable.apply(tensor, group)
