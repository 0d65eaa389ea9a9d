"""Weight sync into the inference engine, and the one way rank 0's HTTP work reaches every rank.

Only world rank 0 talks to the engine. :func:`rank0_call` runs a function there and broadcasts
``(value, error)`` to every rank (one ``broadcast_object`` over the world group, bounded by the
distributed timeout), so an engine failure raises the same :class:`EngineError` on every rank and no
rank waits forever for one that stopped.

A sync strategy (:data:`SYNC_STRATEGIES`, :func:`get_sync_strategy`) moves the trained weights into the
engine after every optimizer step and counts the engine's weight version: ``version = v`` means the
engine holds the weights after ``v`` training steps (the initial checkpoint is version 0), the policy
version each rollout row records. The directory strategy (:class:`DirectorySync`, the one on CPUs and the
default) writes the policy as a Hugging Face directory (the export path, every rank calls it; written
atomically) under a fast local directory (``/dev/shm`` by default), then asks every server to pause,
``reload_weights`` from it, reset its prefix cache and resume. On GPUs vLLM's weight-transfer endpoints
(NCCL broadcast from the trainer to the engine) would be a second strategy here; it is not built (no
GPU to test it on), and asking for it names the valid strategies.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from megatron_rl_agg.engine.client import EngineClient, EngineError
from megatron_rl_agg.parallel import dist

__all__ = ["rank0_call", "WeightSync", "DirectorySync", "SYNC_STRATEGIES", "get_sync_strategy"]


def rank0_call(fn: Callable[[], object], *, is_rank0: bool, device="cpu"):
    """``fn()`` on world rank 0, its value on every rank; an :class:`EngineError` (or any exception) raised
    there is re-raised as :class:`EngineError` with the same message on every rank."""
    value, error = None, None
    if is_rank0:
        try:
            value = fn()
        except Exception as err:                 # noqa: BLE001 - every rank must see it, whatever it is
            error = str(err) if isinstance(err, EngineError) else f"{type(err).__name__}: {err}"
    value, error = dist.broadcast_object((value, error), src=0, device=device)
    if error is not None:
        raise EngineError(error)
    return value


class WeightSync:
    """A way to move the policy's weights into the engine; :attr:`version` counts completed syncs."""

    name = "base"

    def __init__(self, client: Optional[EngineClient], *, is_rank0: bool, device="cpu", version: int = 0):
        self.client, self.is_rank0, self.device = client, is_rank0, device
        self.version = int(version)
        self.last_seconds: dict = {}

    def sync(self, export: Callable[[str], object], version: int) -> int:
        """Push the current weights (every rank calls; ``export(dir)`` is the collective export) and set
        the engine's version to ``version``; returns it."""
        raise NotImplementedError


class DirectorySync(WeightSync):
    """Export to ``directory`` (a Hugging Face directory, atomic), then every server reloads from it."""

    name = "directory"

    def __init__(self, client: Optional[EngineClient], directory: str, *, is_rank0: bool, device="cpu",
                 version: int = 0):
        super().__init__(client, is_rank0=is_rank0, device=device, version=version)
        self.directory = directory

    def sync(self, export: Callable[[str], object], version: int) -> int:
        start = time.perf_counter()
        export(self.directory)                   # every rank: gathers the shards, rank 0 writes
        exported = time.perf_counter()
        rank0_call(lambda: self.client.reload_weights(self.directory), is_rank0=self.is_rank0,
                   device=self.device)
        self.version = int(version)
        self.last_seconds = {"sync_export_s": exported - start, "sync_reload_s": time.perf_counter() - exported}
        return self.version


SYNC_STRATEGIES = {"directory": DirectorySync}


def get_sync_strategy(name: str) -> type:
    """The strategy class registered as ``name``; an unknown name lists the valid ones."""
    try:
        return SYNC_STRATEGIES[name]
    except KeyError:
        raise ValueError(f"weight sync strategy {name!r}; valid: {sorted(SYNC_STRATEGIES)}") from None
