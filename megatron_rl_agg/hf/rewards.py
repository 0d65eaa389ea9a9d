"""Verifiable rewards on response text: one registry, ``--reward NAME`` or ``--reward module:function``.

A reward function takes ``(prompt: str, response: str, answer: str)`` and returns a float. Built in:

* ``math_verify``: 1.0 when the response's final answer is mathematically equal to the reference answer,
  else 0.0 (Hugging Face's ``math-verify``: LaTeX and plain-number extraction, symbolic comparison). Its
  own ``signal.alarm`` timeouts are off (``parsing_timeout=None``, ``timeout_seconds=None``): the trainer
  runs every reward in a worker process with a per-sample time limit that kills a runaway parse
  (:mod:`megatron_rl_agg.hf.reward_pool`, ``--reward-timeout``).
* ``exact_match``: 1.0 when the response's last number (or, when the answer is not a number, the whole
  stripped response) equals the reference answer, else 0.0. Numbers compare exactly as decimals
  (``Decimal``: ``"12345678901234567891" != "12345678901234567890"``, ``"7.50" == "7.5"``), never
  through float.

Reference answers in GSM8K style (``"... #### 72"``) are reduced to the text after ``####`` by
:func:`megatron_rl_agg.hf.prompts.extract_answer` before they get here.

A sample whose reward times out, raises or is non-finite has no reward: the trainer marks it invalid (out
of the group statistics and of the loss, counted as ``num_reward_failures``) and stops the run when more
than ``--max-reward-failure-frac`` of a mini-batch fails (:mod:`megatron_rl_agg.hf.reward_pool`).
"""

from __future__ import annotations

import importlib
import logging
import re
from decimal import Decimal, InvalidOperation
from typing import Callable

__all__ = ["REWARDS", "RewardError", "get_reward", "reward_names", "math_verify_reward", "exact_match_reward"]

RewardFn = Callable[[str, str, str], float]


class RewardError(ValueError):
    """An unknown reward name, or a ``module:function`` that does not import (the message says which)."""


def math_verify_reward(prompt: str, response: str, answer: str) -> float:
    """1.0 if ``response`` verifies against ``answer`` with math-verify, else 0.0."""
    from math_verify import parse, verify

    # The limit is the worker's (reward_pool); without this every call logs that math-verify's are off.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold = parse(answer if "$" in answer or "\\" in answer else f"${answer}$", parsing_timeout=None)
    pred = parse(response, parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str):
    """``text`` (commas dropped) as an exact ``Decimal``, or the stripped text when it is no number."""
    text = text.replace(",", "").strip()
    try:
        return Decimal(text)
    except InvalidOperation:
        return text


def exact_match_reward(prompt: str, response: str, answer: str) -> float:
    """1.0 if the response's last number (or the whole stripped text) equals ``answer``, else 0.0."""
    answer = answer.strip()
    if _NUMBER.fullmatch(answer):
        found = _NUMBER.findall(response)
        return 1.0 if found and _number(found[-1]) == _number(answer) else 0.0
    return 1.0 if response.strip() == answer else 0.0


REWARDS: dict[str, RewardFn] = {"math_verify": math_verify_reward, "exact_match": exact_match_reward}


def reward_names() -> list[str]:
    return sorted(REWARDS)


def get_reward(name: str) -> RewardFn:
    """The reward function for a registry name or a ``module:function`` path.

    Raises:
        RewardError: unknown name (lists the valid ones), or a ``module:function`` whose module does not
            import or has no such callable.
    """
    if name in REWARDS:
        if name == "math_verify":
            try:
                import math_verify  # noqa: F401
            except ImportError as err:
                raise RewardError(f"--reward math_verify needs the math-verify package ({err}); install the "
                                  "'hf' extra") from None
        return REWARDS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # noqa: BLE001 - any import failure is the user's module
            raise RewardError(f"--reward {name!r}: module {module_name!r} does not import: "
                              f"{type(err).__name__}: {err}") from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise RewardError(f"--reward {name!r}: module {module_name!r} has no callable {attr!r}")
        return fn
    raise RewardError(f"unknown --reward {name!r}; valid: {reward_names()} or 'module:function'")
