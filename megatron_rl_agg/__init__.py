"""megatron_rl_agg: exact policy-gradient loss aggregation for RL on Megatron-Core.

The pure math (aggregation weights, advantage normalization, losses) imports only torch; the Megatron
glue (``make_loss_func``, ``forward_step``) is imported lazily on first use so that
``import megatron_rl_agg`` stays cheap.
"""

from megatron_rl_agg.core.aggregation import (
    LOSS_AGGREGATIONS,
    aggregate,
    aggregation_names,
    microbatch_mean_weights,
    resolve_aggregation,
    token_weights,
)
from megatron_rl_agg.core.config import AdvantageConfig, LossConfig, add_loss_aggregation_args

__version__ = "0.1.0"

# name -> module holding it; resolved on first attribute access (PEP 562).
_LAZY = {
    "normalize_advantages": "megatron_rl_agg.core.advantages",
    "compute_step_advantages": "megatron_rl_agg.core.advantages",
    "make_loss_func": "megatron_rl_agg.mcore.loss",
    "forward_step": "megatron_rl_agg.mcore.loss",
    "reduce_metrics": "megatron_rl_agg.core.metrics",
    "enable_cpu_mode": "megatron_rl_agg.mcore.cpu_mode",
}

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
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megatron_rl_agg' has no attribute {name!r}")
