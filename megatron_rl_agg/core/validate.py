"""Argument checks shared by the library and the trainer's flags (pure Python).

One place for "must be a positive integer": the check (an ``int``, not a ``bool``, ``>= 1``) and its
message, ``"<what> must be <must>, got <value!r>"``. The default wording is the library's (``"a positive
int"``); the trainer's flags say ``"a positive integer"`` and raise its ``TrainerArgsError`` (``error``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["positive_int"]


def positive_int(value: Any, what: str, *, must: str = "a positive int", error: type = ValueError,
                 optional: bool = False) -> Any:
    """``value`` when it is an ``int`` (not a ``bool``) ``>= 1``; with ``optional``, None passes too.

    Raises:
        error: ``f"{what} must be {must}, got {value!r}"`` (a bool, a non-int, a value < 1, or None unless
            ``optional``); with ``optional`` the default wording is ``"a positive int or None"``.
    """
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{what} must be {must}{' or None' if optional and must == 'a positive int' else ''}, "
                    f"got {value!r}")
    return value
