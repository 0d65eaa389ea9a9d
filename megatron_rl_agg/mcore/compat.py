"""Megatron-Core's process-group lifecycle and the shims over its releases (0.16 to 0.19).

Lifecycle, so a test or an audit run can build several layouts in one process:
:func:`initialize_distributed` (reads the torchrun environment), :func:`initialize_model_parallel`
(parallel_state + RNG seeding), :func:`destroy_model_parallel` (every group the layout created, and
the MoE metrics) and :func:`destroy_distributed`. Both initializers enable the CPU redirects of
:mod:`megatron_rl_agg.mcore.cpu_mode` in a process without CUDA.

Release shims: :func:`transformer_config_defaults`, :func:`spec_module` / :func:`spec_submodules`
(the two spellings of a layer spec), :func:`moe_metric_per_layer` (the two MoE metric trackers) and
:func:`quiet_warnings` (the known-harmless warnings of megatron-core and torch).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import os
import sys

import torch

from megatron_rl_agg.mcore.cpu_mode import enable_cpu_mode

__all__ = [
    "initialize_distributed",
    "initialize_model_parallel",
    "destroy_model_parallel",
    "destroy_distributed",
    "quiet_warnings",
    "transformer_config_defaults",
    "spec_module",
    "spec_submodules",
    "moe_metric_per_layer",
    "parallel_group",
    "parallel_sizes",
]

# The process groups that existed when initialize_model_parallel last ran (None: it has not run, or its
# layout was torn down since).
_GROUPS_BEFORE_LAYOUT: "set | None" = None

# Warnings megatron-core prints once per process on a machine without Transformer Engine / apex, one
# deprecation it raises from its own defaults, and two that torch raises about the calls
# dist_checkpointing makes on every load. Each names a fallback that is the intended path on CPU (torch
# norm, torch Adam, local multi-tensor helpers) or an API megatron-core itself chose, so they carry no
# information for a user. Matched by message start, category and module, so any other warning shows.
_KNOWN_HARMLESS = (
    ("Transformer Engine and Apex are not installed", UserWarning, "megatron"),
    ("Apex is not installed", UserWarning, "megatron"),
    ("full scope is deprecated", UserWarning, "megatron"),
    ("`load_state_dict` is deprecated", FutureWarning, "megatron"),
    ("Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning, "torch"),
    ("MLP requires ffn_hidden_size, but it was not provided", DeprecationWarning, "megatron"),
    ("Warning: tp_group is None, using default tp group", DeprecationWarning, "megatron"),
)


def quiet_warnings() -> None:
    """Filter :data:`_KNOWN_HARMLESS` in this process; call it before megatron.core is imported (most
    are raised at import time)."""
    import warnings

    for message, category, module in _KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def destroy_distributed() -> None:
    """Tear down Megatron's groups and the default process group (safe to call when none exist).

    Every entry point calls it before exiting: a process that exits with a live gloo / NCCL group can
    abort in the group's destructor ("terminate called without an active exception").
    """
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return                          # no group, so no Megatron groups either (nothing to import)
    destroy_model_parallel()
    torch_dist.destroy_process_group()


def initialize_distributed(timeout_minutes: float = 10) -> tuple[int, int]:
    """Initialise the default process group from the torchrun environment.

    Reads ``RANK``, ``WORLD_SIZE`` (and ``MASTER_ADDR``/``MASTER_PORT`` via ``env://``). Without
    them the process is a world of one: a single-rank group over an in-process ``HashStore`` (no
    port), so Megatron's parallel_state (which requires torch.distributed) works in a plain
    ``python`` run or inside pytest. Backend: nccl with CUDA (binding ``LOCAL_RANK``'s device),
    gloo in CPU mode. Returns at once if a default group already exists.

    Returns:
        ``(rank, world_size)``.
    """
    import torch.distributed as torch_dist

    if torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        enable_cpu_mode()
        backend = "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        torch_dist.init_process_group(backend=backend, timeout=timeout)
    else:
        store = torch_dist.HashStore()
        torch_dist.init_process_group(backend=backend, store=store, rank=0, world_size=1,
                                      timeout=timeout)
    return torch_dist.get_rank(), torch_dist.get_world_size()


def initialize_model_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, *, seed: int = 1234,
                              cp: int = 1, ep: int = 1, timeout_minutes: float | None = None) -> None:
    """Create Megatron's model-parallel groups and seed the RNG tracker.

    The data-parallel size is ``world_size / (tp * pp * cp)``. Any previous model-parallel state is
    destroyed first, so one process can run several layouts in sequence.

    Expert parallelism (Megatron's rule, expert tensor-parallel size = ``tp``): the experts' grid is
    ``tp * ep * pp * edp`` = world, so ``ep`` must divide ``dp * cp``; the expert-data-parallel
    size is ``dp * cp / ep``.

    Args:
        tp, pp, cp: tensor, pipeline and context parallel sizes.
        ep: expert-parallel size (``expert_model_parallel_size``).
        vpp: virtual pipeline stages per pipeline rank (interleaved schedule), or None.
        seed: base seed; Megatron derives the TP-rank dropout seed from it
            (``seed + 2718 + tp_rank``) and seeds the default generator with ``seed``.
        timeout_minutes: collective timeout of the new groups (Megatron's default: 30 minutes; the
            default group keeps the one given to :func:`initialize_distributed`).
    """
    import torch.distributed as torch_dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    enable_cpu_mode()  # the RNG tracker must be the CPU one before Megatron seeds it
    if not torch_dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; call initialize_distributed() first")
    world = torch_dist.get_world_size()
    if world % (tp * pp * cp) != 0:
        raise ValueError(
            f"world size {world} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}; choose sizes whose "
            f"product divides {world}"
        )
    if ep < 1 or world % (tp * pp * ep) != 0:
        raise ValueError(
            f"expert_model_parallel_size={ep} does not fit world size {world} with tp={tp}, pp={pp}: "
            f"Megatron lays experts out as tp * ep * pp * expert-dp = world, so ep must divide "
            f"dp * cp = {world // (tp * pp * cp)}")
    if vpp is not None and (vpp < 2 or pp < 2):
        raise ValueError(f"vpp={vpp} needs vpp >= 2 and pp >= 2 (got pp={pp}); use vpp=None otherwise")
    destroy_model_parallel()
    global _GROUPS_BEFORE_LAYOUT
    _GROUPS_BEFORE_LAYOUT = set(_registered_groups())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        **({} if timeout_minutes is None else {"distributed_timeout_minutes": timeout_minutes}),
    )
    torch.manual_seed(seed)
    mp_random.model_parallel_cuda_manual_seed(seed)


def _registered_groups() -> list:
    """Every process group torch.distributed holds, the default one included (none before init)."""
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return []
    return list(torch_dist.distributed_c10d._world.pg_map)


def destroy_model_parallel() -> None:
    """Tear down Megatron's model-parallel groups (safe to call when none exist).

    Megatron's MoE metrics tracker is reset too (:func:`moe_metric_per_layer`): it keeps a per-layer
    tensor sized by the first model that recorded into it, and the groups of that layout.

    Megatron's ``parallel_state.destroy_model_parallel`` only drops its references to most groups (it
    destroys the ``*_GLOO`` ones): torch.distributed keeps the rest registered, each with its gloo / NCCL
    threads and connections. A process that runs layout after layout (the trainer's ``run`` is
    re-entrant; the tests run dozens per launch) would keep them all: measured with megatron-core 0.19.2,
    ~60 threads and ~90 file descriptors more per trainer run, and collectives that slow down as they pile
    up (a 2-process launch of 55 runs took 10 min instead of 1). So every group registered since
    :func:`initialize_model_parallel` set this layout up (Megatron's, and any the model, DDP or the
    trainer created for it) is destroyed too; the default group and groups that existed before stay.

    ``destroy_process_group`` unregisters a gloo group, but its worker threads and sockets live until
    the C++ object is freed, and a Megatron model (which keeps its groups) is freed only by the cycle
    collector: measured with megatron-core 0.19.2 at 4 processes, 57 threads and 89 fds more per layout
    without a collection (~700 threads after the 12 layouts of one test launch, and collectives twice as
    slow as in a fresh process). So a collection runs here, after the caller has dropped the previous
    layout's model (:func:`initialize_model_parallel` calls this first).
    """
    global _GROUPS_BEFORE_LAYOUT
    import torch.distributed as torch_dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _reset_moe_metrics()
    before, _GROUPS_BEFORE_LAYOUT = _GROUPS_BEFORE_LAYOUT, None
    if before is None:
        return      # no layout of ours was up: nothing destroyed, nothing for the collector to free
    for group in _registered_groups():
        if group not in before and group is not torch_dist.GroupMember.WORLD:
            torch_dist.destroy_process_group(group)
    gc.collect()


def transformer_config_defaults() -> dict:
    """``TransformerConfig`` keywords that spell the defaults in the current megatron-core's terms.

    megatron-core 0.19 renamed ``cuda_graph_scope`` to ``cuda_graph_modules`` and kept the old
    default ``"full"`` (the whole layer), which it rewrites to ``[]`` in ``__post_init__`` with a
    "full scope is deprecated" warning on every config; ``[]`` means the same and warns not. Releases
    without the field (<= 0.18) get no keyword. Pass these first, so explicit settings override them.
    """
    from megatron.core.transformer import TransformerConfig

    names = {field.name for field in dataclasses.fields(TransformerConfig)}
    return {"cuda_graph_modules": []} if "cuda_graph_modules" in names else {}


def spec_module(spec):
    """The class a layer-spec entry builds, or None for an entry that is not a spec.

    megatron-core <= 0.18 writes every entry as a ``ModuleSpec(module=..., submodules=...)``; 0.19
    writes the MLP / MoE / expert entries as ``functools.partial(cls, submodules=...)`` builders. A
    plain class (``WrappedTorchNorm``) is its own module.
    """
    if isinstance(spec, functools.partial):
        return spec.func
    if isinstance(spec, type):
        return spec
    return getattr(spec, "module", None)


def spec_submodules(spec):
    """The ``submodules`` of a layer-spec entry in either form (see :func:`spec_module`), or None."""
    if isinstance(spec, functools.partial):
        return spec.keywords.get("submodules")
    return getattr(spec, "submodules", None)


def moe_metric_per_layer(name: str = "load_balancing_loss") -> "torch.Tensor | None":
    """One MoE metric Megatron's routers recorded since the last call, per layer (``[num_layers]``,
    summed over micro-batches), reduced across ranks as Megatron reduces it (sum over PP stages and the
    router's reduce group, average over DP); the tracker is then zeroed for the next step. None if no
    layer recorded ``name``. Collective: every rank must call it.

    megatron-core 0.17 and later keep the tracker in ``moe_logging.MoEMetricsTracker`` (the old
    ``moe_utils`` functions are deprecated wrappers that warn); 0.16 in a module dict of ``moe_utils``.
    The reduction of 0.19 is ``MoEMetricsTracker._sync_metrics``, which its deprecation notice names as
    the replacement of ``reduce_aux_losses_tracker_across_ranks``.
    """
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe import moe_utils

        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        if name not in tracker:
            return None
        moe_utils.reduce_aux_losses_tracker_across_ranks([name])
        values = tracker[name]["values"].clone()
        moe_utils.clear_aux_losses_tracker()
        return values
    tracker = get_moe_metrics_tracker()
    if name not in tracker.metrics:
        return None
    tracker._sync_metrics([name])
    values = tracker.metrics[name].values.clone()
    tracker.clear()
    return values


def _reset_moe_metrics() -> None:
    """Forget every MoE metric entry (its per-layer size and groups), as at process start."""
    if "megatron.core.transformer.moe" not in sys.modules:
        return                                  # no MoE module imported: nothing recorded
    try:
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe import moe_utils

        moe_utils.get_moe_layer_wise_logging_tracker().clear()      # the module's dict itself (0.16)
        return
    destroy_moe_metrics_tracker()


# ----------------------------------------------------------------------------------------------
# The live layout, read from Megatron's parallel_state: the one place that asks it for groups and sizes.
# ----------------------------------------------------------------------------------------------

def _getters(kind: str):
    from megatron.core import parallel_state as ps

    table = {
        "tp": (ps.get_tensor_model_parallel_group, ps.get_tensor_model_parallel_world_size,
               ps.get_tensor_model_parallel_rank),
        "cp": (ps.get_context_parallel_group, ps.get_context_parallel_world_size, ps.get_context_parallel_rank),
    }
    if kind not in table:
        raise ValueError(f"unknown parallel dimension {kind!r}; valid: {', '.join(table)}")
    return table[kind]


def parallel_group(kind: str) -> tuple[object, int, int]:
    """``(group, size, rank)`` of this rank's tensor-parallel (``"tp"``) or context-parallel (``"cp"``) group.

    ``(None, 1, 0)`` when the dimension has one rank or no layout is initialized, so callers (and the
    collectives of :mod:`megatron_rl_agg.parallel.dist`) take the single-process path without a group.
    """
    group, size, rank = _getters(kind)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized() or size() == 1:
        return None, 1, 0
    return group(), size(), rank()


def parallel_sizes() -> tuple[int, int, "int | None", int, int]:
    """``(tp, pp, vpp, cp, ep)`` of the initialized layout (``vpp`` None without interleaving).

    Raises:
        RuntimeError: no layout is initialized (call :func:`initialize_model_parallel` first).
    """
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("Megatron model-parallel state is not initialised; call "
                           "compat.initialize_model_parallel(tp, pp, vpp) first")
    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size(), ps.get_context_parallel_world_size(),
            ps.get_expert_model_parallel_world_size())
