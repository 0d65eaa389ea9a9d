"""Verifiable rewards on response text: one registry, ``--reward NAME`` or ``--reward module:function``.

A reward function takes ``(prompt: str, response: str, answer: str)`` and returns a float. Built in:

* ``math_verify``: 1.0 when the response's final answer is mathematically equal to the reference answer,
  else 0.0 (Hugging Face's ``math-verify``: LaTeX and plain-number extraction, symbolic comparison). It
  runs without ``signal.alarm`` (``parsing_timeout=None``, ``timeout_seconds=None``), so it works off the
  main thread and inside workers.
* ``exact_match``: 1.0 when the response's last number (or, when the answer is not a number, the whole
  stripped response) equals the reference answer, else 0.0.

Reference answers in GSM8K style (``"... #### 72"``) are reduced to the text after ``####`` by
:func:`megatron_rl_agg.hf.prompts.extract_answer` before they get here.

A failure on one sample (an exception inside the reward function, or a non-finite value) gives that
sample 0.0 and is counted (:class:`RewardScorer.num_failures`), never a dead run.
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Callable

__all__ = ["REWARDS", "RewardError", "get_reward", "reward_names", "RewardScorer", "math_verify_reward",
           "exact_match_reward"]

RewardFn = Callable[[str, str, str], float]


class RewardError(ValueError):
    """An unknown reward name, or a ``module:function`` that does not import (the message says which)."""


def math_verify_reward(prompt: str, response: str, answer: str) -> float:
    """1.0 if ``response`` verifies against ``answer`` with math-verify, else 0.0."""
    from math_verify import parse, verify

    gold = parse(answer if "$" in answer or "\\" in answer else f"${answer}$", parsing_timeout=None)
    pred = parse(response, parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _normalize_number(text: str) -> str:
    text = text.replace(",", "").strip()
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else repr(value)


def exact_match_reward(prompt: str, response: str, answer: str) -> float:
    """1.0 if the response's last number (or the whole stripped text) equals ``answer``, else 0.0."""
    answer = answer.strip()
    if _NUMBER.fullmatch(answer):
        found = _NUMBER.findall(response)
        return 1.0 if found and _normalize_number(found[-1]) == _normalize_number(answer) else 0.0
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


class RewardScorer:
    """Applies a reward function sample by sample; failures give 0.0 and are counted."""

    def __init__(self, fn: RewardFn):
        self.fn = fn
        self.num_failures = 0
        self.last_error: str = ""

    def __call__(self, prompt: str, response: str, answer: str) -> float:
        try:
            value = float(self.fn(prompt, response, answer))
        except Exception as err:  # noqa: BLE001 - one bad sample must not end the run
            self.num_failures += 1
            self.last_error = f"{type(err).__name__}: {err}"
            return 0.0
        if not math.isfinite(value):
            self.num_failures += 1
            self.last_error = f"non-finite reward {value!r}"
            return 0.0
        return value
