"""Save and resume with Megatron's ``dist_checkpointing``, loadable at any other parallel layout.

Directory layout (Megatron-LM's convention)::

    <save>/latest_checkpointed_iteration.txt     the last complete step, written after everything else
    <save>/iter_0000012/                          dist_checkpointing: model, optimizer (sharded tensors)
    <save>/iter_0000012/trainer_state.json        step, layout, model sizes, flags that must not change
                                                  on resume, and every file of the save with its size
    <save>/iter_0000012/rng/rank_00003.pt         every RNG of global rank 3 (python, torch, Megatron's)

Model and optimizer tensors are stored under their *global* keys (``decoder.layers.*`` stacked along a
layer axis, TP shards as slices of the full tensor), so a checkpoint written at one TP / PP / VPP / DP
layout loads at any other: dist_checkpointing reads each rank's slice of every tensor. The distributed
optimizer saves its state in the ``fully_reshardable`` format for the same reason.

The RNG files hold per-process generator states and only mean something for the same process layout: at
a different layout they are not restored (the trainer says so on rank 0). The trainer's own random draws
(prompts, sampling noise, lost samples) are counter-based (see ``generation.step_generator``) and need no
state, so a resumed run reproduces the uninterrupted one either way.

Safety (docs/reliability.md): the state file and the tracker are written atomically (temporary file,
fsync, rename) and in that order, after every rank's files, so an interrupted save leaves the tracker on
the previous complete step; :func:`resolve_step` checks the latest checkpoint against the file list of
its state file (and falls back to the previous complete one on request); :func:`check_model` refuses a
checkpoint of another architecture; :func:`check_save_dir` refuses to write over another run's saves.
"""

from __future__ import annotations

import json
import os
import random
from typing import Optional, Sequence

import torch

from megatron_rl_agg.parallel import dist
from megatron_rl_agg.mcore.cpu_mode import device
from megatron_rl_agg.mcore.build import unwrap

__all__ = ["TRACKER_FILE", "checkpoint_path", "latest_step", "save_checkpoint", "load_checkpoint",
           "load_model_weights", "atomic_write_text", "check_save_dir", "resolve_step", "check_model",
           "CheckpointError"]

TRACKER_FILE = "latest_checkpointed_iteration.txt"
STATE_FILE = "trainer_state.json"
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used as asked (the message names it and what to do)."""


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old content or the new, never a part:
    write a temporary file beside it, fsync it, rename it over ``path`` (atomic on POSIX), fsync the
    directory so the rename survives a crash."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _iter_steps(root: str) -> list[int]:
    """Steps of the ``iter_*`` directories in ``root`` (complete or not), ascending."""
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        if name.startswith("iter_") and name[5:].isdigit() and os.path.isdir(os.path.join(root, name)):
            steps.append(int(name[5:]))
    return sorted(steps)


def check_save_dir(save: Optional[str], load: Optional[str]) -> None:
    """Refuse a ``--save`` directory that holds another run's checkpoints.

    A fresh run (no ``--load``, or ``--load`` of another directory) would overwrite the tracker with its
    own step and then the ``iter_*`` directories it reaches: the earlier run would be lost. Resuming that
    run (``--load`` the same directory) is the one way to write into it.

    Raises:
        CheckpointError: naming the directory, its latest step and both ways out.
    """
    if not save:
        return
    steps = _iter_steps(save)
    has_tracker = os.path.isfile(os.path.join(save, TRACKER_FILE))
    if not steps and not has_tracker:
        return
    if load and os.path.realpath(load) == os.path.realpath(save):
        return
    latest = f"latest step {latest_step(save)}" if has_tracker else f"iter_* directories {steps[-3:]}"
    raise CheckpointError(
        f"--save {save} already holds checkpoints of another run ({latest}); this run would overwrite "
        f"them. Resume that run with --load {save}, or give an empty or new --save directory")


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
        raise CheckpointError(f"{tracker}: expected a step number, got {text[:40]!r} (a corrupt tracker); "
                              "--load-fallback resumes from the newest complete checkpoint instead")
    return int(text)


def _incomplete(path: str) -> Optional[str]:
    """Why the checkpoint directory ``path`` cannot be loaded, or None when it is complete: its trainer
    state must parse and list every file of the save (``files``: relative path -> size in bytes)."""
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isdir(path):
        return "the directory is missing"
    try:
        with open(state_file, encoding="utf-8") as fh:
            saved = json.load(fh)
    except FileNotFoundError:
        return f"{STATE_FILE} is missing (the save did not finish)"
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} does not parse ({err})"
    for rel, size in saved.get("files", {}).items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, the save wrote {size}"
    return None


def resolve_step(root: str, fallback: bool = False) -> tuple[int, Optional[str]]:
    """``(step, note)``: the step ``--load root`` resumes from, after checking that checkpoint is whole.

    The tracker names the latest step. When that checkpoint (or the tracker) is damaged, ``fallback``
    picks the newest complete ``iter_*`` before it and ``note`` says so; otherwise it is an error.

    Raises:
        FileNotFoundError: ``root`` holds no checkpoint at all.
        CheckpointError: the latest checkpoint is incomplete or corrupt (and no fallback was asked or
            none is complete), naming what is wrong and the fallback.
    """
    try:
        latest = latest_step(root)
        problem = _incomplete(checkpoint_path(root, latest))
    except CheckpointError as err:
        if not fallback:
            raise
        latest, problem = None, str(err)
    if problem is None:
        return latest, None
    where = f"latest checkpoint {checkpoint_path(root, latest)}" if latest is not None else f"--load {root}"
    older = [s for s in _iter_steps(root) if latest is None or s < latest]
    complete = [s for s in older if _incomplete(checkpoint_path(root, s)) is None]
    if not fallback:
        hint = (f"--load-fallback resumes from step {complete[-1]}, the newest complete one" if complete
                else "no earlier complete checkpoint exists")
        raise CheckpointError(f"{where} is incomplete or corrupt: {problem}; {hint}")
    if not complete:
        raise CheckpointError(f"{where} is incomplete or corrupt: {problem}; --load-fallback found no "
                              f"earlier complete checkpoint in {root}")
    return complete[-1], f"{where} is incomplete or corrupt ({problem}): resuming from step {complete[-1]}"


# Architecture entries of trainer_state.json's "model": a checkpoint loads only into the same ones.
MODEL_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
              "seq_length")


def check_model(root: str, step: int, model: dict) -> None:
    """Refuse to load checkpoint ``step`` of ``root`` into a model whose architecture differs.

    Raises:
        CheckpointError: naming each differing size with the checkpoint's value and the flag's.
    """
    with open(os.path.join(checkpoint_path(root, step), STATE_FILE), encoding="utf-8") as fh:
        saved = json.load(fh).get("model")
    if saved is None:   # written before the architecture was recorded: dist_checkpointing checks shapes
        return
    diff = [f"--{k.replace('_', '-')} {model[k]} (checkpoint: {saved[k]})" for k in MODEL_KEYS
            if k in saved and k in model and saved[k] != model[k]]
    if diff:
        raise CheckpointError(f"{checkpoint_path(root, step)} holds a different model than the flags say: "
                              f"{', '.join(diff)}; use the checkpoint's sizes")


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
        os.makedirs(path, exist_ok=True)
    dist.barrier(device())
    state = _model_state(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False, metadata=_OPTIM_METADATA)
    dist_checkpointing.save(state, path)
    os.makedirs(os.path.join(path, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(path, "rng", f"rank_{rank:05d}.pt"))
    dist.barrier(device())
    if rank == 0:
        # Every rank's files are on disk now; the state file lists them with their sizes, so a later load
        # can tell a complete checkpoint from one that lost a file. Written atomically, then the tracker.
        files = {os.path.relpath(os.path.join(d, f), path): os.path.getsize(os.path.join(d, f))
                 for d, _, names in os.walk(path) for f in names if f != STATE_FILE}
        atomic_write_text(os.path.join(path, STATE_FILE), json.dumps(
            {**trainer_state, "step": step, "world_size": world_size, "files": files}, indent=1,
            sort_keys=True))
        atomic_write_text(os.path.join(root, TRACKER_FILE), f"{step}\n")
    dist.barrier(device())
    return path


def load_model_weights(root: str, chunks: Sequence, step: Optional[int] = None) -> int:
    """Load only the model weights of ``root`` (its latest step unless given) into ``chunks``.

    Returns the step loaded.
    """
    from megatron.core import dist_checkpointing

    step = resolve_step(root)[0] if step is None else step       # a complete checkpoint, or an error
    state = _model_state(chunks)
    loaded = dist_checkpointing.load(state, checkpoint_path(root, step))
    _copy_model(chunks, loaded)
    return step


def _copy_model(chunks: Sequence, loaded: dict) -> None:
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks):
        unwrap(chunk).load_state_dict(loaded[key], strict=True)


def load_checkpoint(root: str, chunks: Sequence, optimizer, layout: dict, *, rank: int,
                    world_size: int, step: Optional[int] = None) -> dict:
    """Resume from ``root``'s latest checkpoint (or ``step``, see :func:`resolve_step`): model, optimizer
    and (same layout only) RNG states.

    Args:
        layout: this run's ``{"tp", "pp", "vpp", "dp"}``; RNG files are restored only when it and the
            world size equal the saved ones.
        step: the checkpoint to load (default: the tracker's).

    Returns:
        The saved trainer state (``step``, ``layout``, ...) plus ``rng_restored`` (bool).
    """
    from megatron.core import dist_checkpointing

    step = latest_step(root) if step is None else step
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
