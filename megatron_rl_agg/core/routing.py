"""MoE routing replay modes: the one registry of ``--moe-routing-replay`` (pure Python).

The replay itself (Megatron's ``RouterReplay``, routes sliced like tokens) is
:mod:`megatron_rl_agg.mcore.routing_replay`; docs/routing_replay.md describes R2 and R3.
"""

from __future__ import annotations

__all__ = ["REPLAY_MODES", "get_replay_mode"]

# name -> what the update replays
REPLAY_MODES = {
    "off": "no replay: the update routes with the live router",
    "r2": "replay the routes recorded in the proximal / old log-prob forward",
    "r3": "replay the routes the rollout engine used (the rollout's per-token routes)",
}


def get_replay_mode(name: str) -> str:
    """``name`` if it is a routing-replay mode, else a ValueError listing the valid ones."""
    if name not in REPLAY_MODES:
        raise ValueError(f"unknown MoE routing replay mode {name!r}; valid: {', '.join(REPLAY_MODES)}")
    return name
