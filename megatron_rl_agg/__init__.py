"""megatron_rl_agg: exact policy-gradient loss aggregation for RL on Megatron-Core.

One public surface: every name below is importable from the top-level package. The pure math
(``core/``: aggregation modes, configs, context-parallel indices) and the global weights
(``parallel/``) are imported eagerly and need only torch; everything that imports Megatron-Core
(``mcore/``), transformers (``hf/``) or the trainer is resolved on first attribute access (PEP 562), so
``import megatron_rl_agg`` stays cheap. The package layout and what each part may import:
docs/index.md#architecture.
"""

from megatron_rl_agg.core.aggregation import (
    LOSS_AGGREGATIONS,
    aggregate,
    aggregation_names,
    microbatch_mean_weights,
    resolve_aggregation,
)
from megatron_rl_agg.core.config import AdvantageConfig, LossConfig, add_loss_aggregation_args
from megatron_rl_agg.core.context_parallel import check_cp_seq_length, zigzag_indices
from megatron_rl_agg.parallel.weights import token_weights

__version__ = "0.1.0"

# defining module -> the names it exports here; resolved on first attribute access.
_LAZY_MODULES = {
    "megatron_rl_agg.parallel.advantages": ("normalize_advantages", "compute_step_advantages"),
    "megatron_rl_agg.parallel.metrics": ("reduce_metrics",),
    "megatron_rl_agg.mcore.batch": ("prepare_microbatches",),
    "megatron_rl_agg.mcore.loss": ("make_loss_func", "forward_step"),
    "megatron_rl_agg.mcore.setup_checks": ("check_megatron_setup",),
    "megatron_rl_agg.mcore.spec": ("GPTSpec",),
    "megatron_rl_agg.mcore.build": ("build_model", "build_optimizer"),
    "megatron_rl_agg.mcore.weights": ("init_weights", "gather_full_grads"),
    "megatron_rl_agg.mcore.packing": ("pack_microbatches", "packed_forward_step"),
    "megatron_rl_agg.mcore.packed_attention": ("packed_local_layer_spec",),
    "megatron_rl_agg.mcore.cpu_mode": ("enable_cpu_mode",),
    "megatron_rl_agg.hf.load": ("HFCheckpoint", "gpt_spec_from_hf", "load_hf_weights"),
    "megatron_rl_agg.trainer.rollout.rollouts": ("read_rollouts",),
}
_LAZY = {name: module for module, names in _LAZY_MODULES.items() for name in names}

__all__ = [
    "LOSS_AGGREGATIONS",
    "aggregate",
    "aggregation_names",
    "microbatch_mean_weights",
    "resolve_aggregation",
    "token_weights",
    "LossConfig",
    "AdvantageConfig",
    "add_loss_aggregation_args",
    "check_cp_seq_length",
    "zigzag_indices",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megatron_rl_agg' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
