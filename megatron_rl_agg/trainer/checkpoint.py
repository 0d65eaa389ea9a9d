"""Save and resume with Megatron's ``dist_checkpointing``, loadable at any other parallel layout.

Directory layout (Megatron-LM's convention)::

    <save>/latest_checkpointed_iteration.txt     the last complete step, written after everything else
    <save>/iter_0000012/                          dist_checkpointing: model, optimizer (sharded tensors)
    <save>/iter_0000012/trainer_state.json        step, layout, flags that must not change on resume
    <save>/iter_0000012/rng/rank_00003.pt         every RNG of global rank 3 (python, torch, Megatron's)

Model and optimizer tensors are stored under their *global* keys (``decoder.layers.*`` stacked along a
layer axis, TP shards as slices of the full tensor), so a checkpoint written at one TP / PP / VPP / DP
layout loads at any other: dist_checkpointing reads each rank's slice of every tensor. The distributed
optimizer saves its state in the ``fully_reshardable`` format for the same reason.

The RNG files hold per-process generator states and only mean something for the same process layout: at
a different layout they are not restored (the trainer says so on rank 0). The trainer's own random draws
(prompts, sampling noise, lost samples) are counter-based (see ``generation.step_generator``) and need no
state, so a resumed run reproduces the uninterrupted one either way.
"""

from __future__ import annotations

import json
import os
import random
from typing import Optional, Sequence

import torch

from megatron_rl_agg import dist
from megatron_rl_agg.model import unwrap

__all__ = ["TRACKER_FILE", "checkpoint_path", "latest_step", "save_checkpoint", "load_checkpoint",
           "load_model_weights"]

TRACKER_FILE = "latest_checkpointed_iteration.txt"
STATE_FILE = "trainer_state.json"
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def checkpoint_path(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def latest_step(root: str) -> int:
    """The step recorded in ``root``'s tracker file.

    Raises:
        FileNotFoundError: no tracker file (not a checkpoint directory, or no save completed).
    """
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(tracker):
        raise FileNotFoundError(f"{root!r} holds no checkpoint: {TRACKER_FILE} is missing")
    with open(tracker, encoding="utf-8") as fh:
        text = fh.read().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker}: expected a step number, got {text!r}")
    return int(text)


def _model_state(chunks: Sequence) -> dict:
    # Megatron-LM's keys: "model" for one chunk, "model0".. for virtual stages. The tensors inside carry
    # global keys, so the nesting does not tie the checkpoint to a layout.
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: str, step: int, chunks: Sequence, optimizer, trainer_state: dict, *,
                    rank: int, world_size: int) -> str:
    """Save model, optimizer, RNG and ``trainer_state`` (JSON-able) as step ``step``; every rank calls.

    ``rank`` / ``world_size`` are this process's global rank and the world size (RNG file names).

    The tracker file is written last, by rank 0, after a barrier-like all-reduce, so an interrupted
    save never becomes the checkpoint that ``--load`` resumes from.
    """
    from megatron.core import dist_checkpointing

    path = checkpoint_path(root, step)
    if rank == 0:
        os.makedirs(os.path.join(path, "rng"), exist_ok=True)
    _barrier()
    state = _model_state(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False, metadata=_OPTIM_METADATA)
    dist_checkpointing.save(state, path)
    torch.save(_rng_state(), os.path.join(path, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        with open(os.path.join(path, STATE_FILE), "w", encoding="utf-8") as fh:
            json.dump({**trainer_state, "step": step, "world_size": world_size}, fh, indent=1, sort_keys=True)
    _barrier()
    if rank == 0:
        with open(os.path.join(root, TRACKER_FILE), "w", encoding="utf-8") as fh:
            fh.write(f"{step}\n")
    _barrier()
    return path


def _barrier() -> None:
    """Return only when every rank has reached it: a sum over the DP group, then over the model-parallel
    group. Every rank is a DP peer of some model-parallel peer of every other rank, and each rank enters
    the second sum only after finishing the first, so the chain waits for the whole world."""
    from megatron.core import parallel_state

    from megatron_rl_agg.megatron_compat import device

    for group in (parallel_state.get_data_parallel_group(), parallel_state.get_model_parallel_group()):
        dist.all_reduce_sum(torch.zeros(1, device=device()), group)


def load_model_weights(root: str, chunks: Sequence, step: Optional[int] = None) -> int:
    """Load only the model weights of ``root`` (its latest step unless given) into ``chunks``.

    Returns the step loaded.
    """
    from megatron.core import dist_checkpointing

    step = latest_step(root) if step is None else step
    state = _model_state(chunks)
    loaded = dist_checkpointing.load(state, checkpoint_path(root, step))
    _copy_model(chunks, loaded)
    return step


def _copy_model(chunks: Sequence, loaded: dict) -> None:
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks):
        unwrap(chunk).load_state_dict(loaded[key], strict=True)


def load_checkpoint(root: str, chunks: Sequence, optimizer, layout: dict, *, rank: int,
                    world_size: int) -> dict:
    """Resume from ``root``'s latest checkpoint: model, optimizer and (same layout only) RNG states.

    Args:
        layout: this run's ``{"tp", "pp", "vpp", "dp"}``; RNG files are restored only when it and the
            world size equal the saved ones.

    Returns:
        The saved trainer state (``step``, ``layout``, ...) plus ``rng_restored`` (bool).
    """
    from megatron.core import dist_checkpointing

    step = latest_step(root)
    path = checkpoint_path(root, step)
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as fh:
        saved = json.load(fh)
    state = _model_state(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=_OPTIM_METADATA)
    loaded = dist_checkpointing.load(state, path)
    _copy_model(chunks, loaded)
    optimizer.load_state_dict(loaded["optimizer"])
    same_layout = saved.get("layout") == layout and saved.get("world_size") == world_size
    if same_layout:
        _set_rng_state(torch.load(os.path.join(path, "rng", f"rank_{rank:05d}.pt"), weights_only=True))
    return {**saved, "rng_restored": same_layout}
