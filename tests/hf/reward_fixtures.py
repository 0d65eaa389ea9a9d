"""Reward functions for the reward-pool tests, importable by name (``--reward reward_fixtures:flaky``)."""

import time


def flaky(prompt: str, response: str, answer: str) -> float:
    """By response text: ``sleep`` never returns in time, ``raise`` raises, ``nan`` / ``inf`` are not
    finite; anything else scores 1.0 when it equals ``answer``, else 0.25."""
    if response == "sleep":
        time.sleep(120)
    if response == "raise":
        raise ZeroDivisionError("the parser divided by zero")
    if response in ("nan", "inf"):
        return float(response)
    return 1.0 if response == answer else 0.25


def odd_length_raises(prompt: str, response: str, answer: str) -> float:
    """Raises on a response of odd length (some samples of a run), else 1.0 for a response holding the
    answer, else 0.0."""
    if len(response) % 2:
        raise ValueError(f"odd length {len(response)}")
    return 1.0 if answer in response else 0.0
