"""Counter-based seeds: a 63-bit seed, or a CPU generator, from a tuple of parts (pure; hashlib and torch).

Every random stream the plugin draws (initial weights, on-policy prompts and sampling noise, rollout
failures, the order of a text prompt file per epoch) is seeded from the run's ``--seed`` and what the
draw is for, never from a process's RNG state, so it is the same at every layout and after a resume::

    stable_seed(seed, *parts) = int.from_bytes(sha256("/".join(map(str, (seed, *parts))))[:8], "little")
                                & (2**63 - 1)

SHA-256 of distinct strings never collide in practice, so two purposes never share a stream. The hashed
string is part of the numbers a run produces: ``stable_seed(1234, "w[0]")`` hashes ``"1234/w[0]"``;
changing a call site's parts changes its draws.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["stable_seed", "seeded_generator"]


def stable_seed(*parts) -> int:
    """A seed in ``[0, 2**63)`` from SHA-256 of ``parts`` joined by ``/`` (each formatted by ``str``)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(*parts) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`stable_seed` of ``parts``."""
    return torch.Generator().manual_seed(stable_seed(*parts))
