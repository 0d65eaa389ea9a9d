"""Argument checks shared by the library and the trainer's flags (pure Python).

One place for "must be a positive integer": the check (an ``int``, not a ``bool``, ``>= 1``) and its
message, ``"<what> must be <must>, got <value!r>"``. The default wording is the library's (``"a positive
int"``); the trainer's flags say ``"a positive integer"`` and raise its ``TrainerArgsError`` (``error``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["positive_int"]


def positive_int(value: Any, what: str, *, must: str = "a positive int", error: type = ValueError) -> int:
    """``value`` when it is an ``int`` (not a ``bool``) ``>= 1``.

    Raises:
        error: ``f"{what} must be {must}, got {value!r}"`` (None, a bool, a non-int or a value < 1).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{what} must be {must}, got {value!r}")
    return value
