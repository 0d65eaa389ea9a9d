"""A synthetic verifiable task that a tiny GPT trained from scratch learns within minutes by RL alone.

The "counting" task. A prompt names a start digit ``s`` and a count ``n``; the correct response counts
on from ``s`` for ``n`` digits (modulo 10) and then stops::

    prompt   = [BOS, d_1 .. d_k, LEN_n, s]        k distractor digits, 0 <= k <= max_distractors
    target   = [(s + 1) % 10, (s + 2) % 10, .., (s + n) % 10, EOS]

    e.g. [BOS, 4, LEN_3, 8]  ->  [9, 0, 1, EOS]

Why a tiny model learns it quickly: the reward is a curriculum of three nested skills, each paid for
separately so that every one gives a gradient before the next is learned.

1. answer with digits at all (any digit, 10 of the vocabulary's tokens);
2. count: each digit is one more than the token just before it (``x -> (x + 1) % 10``, the first one
   relative to ``s``). A step is judged against the token actually emitted before it, not against the
   target position, so its credit depends only on a bigram: the policy can learn it token by token, and
   a wrong digit costs one step instead of every digit after it;
3. stop after exactly ``n`` digits: needs attention back to ``LEN_n`` and position counting (slowest).

The distractors make prompts (and so rows) of unequal length.

Reward (partial credit, in ``[0, 1]``), computed by :func:`reward` from the prompt and response alone::

    body     = response up to (excluding) its first EOS;  prev_0 = s, prev_i = body[i - 1]
    is_digit = #{i < n : body[i] is a digit}
    steps    = #{i < n : prev_i is a digit and body[i] == (prev_i + 1) % 10}
    stopped  = 1 if the response is exactly the target (n digits counting on from s, then EOS) else 0
    reward   = FORMAT_CREDIT * is_digit / n + STEP_CREDIT * steps / n + STOP_CREDIT * stopped
                                                                       (0.2, 0.6, 0.2)

The target is the only response with ``steps = n`` and a stop, so reward 1 means exactly right. A
uniformly random policy over a 32-token vocabulary scores about ``0.2 * 10/32 + 0.6 / 32 = 0.08``;
random digits score 0.2 + 0.06, counting without stopping 0.8, a perfect policy 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "FORMAT_CREDIT",
    "STEP_CREDIT",
    "STOP_CREDIT",
    "CountingTask",
    "len_token",
    "parse_prompt",
    "target_response",
    "reward",
]

NUM_DIGITS = 10
BOS, EOS, PAD = 10, 11, 12
_LEN_BASE = 13          # LEN_n is token 13 + n
FORMAT_CREDIT, STEP_CREDIT, STOP_CREDIT = 0.2, 0.6, 0.2


def len_token(n: int) -> int:
    """Token id of ``LEN_n`` (``n >= 1``)."""
    return _LEN_BASE + n


@dataclass(frozen=True, kw_only=True)
class CountingTask:
    """Prompt distribution of the counting task."""

    min_count: int = 2
    """Smallest count ``n`` a prompt asks for."""
    max_count: int = 5
    """Largest count ``n``; a correct response has ``n + 1`` tokens (the digits and EOS)."""
    max_distractors: int = 2
    """Prompts carry 0 .. this many distractor digits before ``LEN_n`` (unequal prompt lengths)."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_count <= self.max_count:
            raise ValueError(f"need 1 <= min_count <= max_count, got {self.min_count}, {self.max_count}")
        if self.max_distractors < 0:
            raise ValueError(f"max_distractors must be >= 0, got {self.max_distractors}")

    @property
    def min_vocab_size(self) -> int:
        """Smallest vocabulary holding every token the task uses."""
        return len_token(self.max_count) + 1

    @property
    def max_prompt_length(self) -> int:
        return self.max_distractors + 3

    @property
    def max_target_length(self) -> int:
        """Tokens of the longest correct response (``max_count`` digits and EOS)."""
        return self.max_count + 1

    def check_vocab(self, vocab_size: int) -> None:
        """Raise unless ``vocab_size`` holds every task token."""
        if vocab_size < self.min_vocab_size:
            raise ValueError(f"--vocab-size {vocab_size} is too small for the counting task with "
                             f"max_count={self.max_count}: needs >= {self.min_vocab_size}")

    def sample_prompts(self, num: int, generator: torch.Generator) -> list[list[int]]:
        """``num`` prompts drawn with ``generator`` (the draws depend only on its state)."""
        prompts = []
        for _ in range(num):
            k = int(torch.randint(0, self.max_distractors + 1, (), generator=generator))
            distractors = torch.randint(0, NUM_DIGITS, (k,), generator=generator).tolist()
            n = int(torch.randint(self.min_count, self.max_count + 1, (), generator=generator))
            start = int(torch.randint(0, NUM_DIGITS, (), generator=generator))
            prompts.append([BOS, *distractors, len_token(n), start])
        return prompts


def parse_prompt(prompt: Sequence[int]) -> tuple[int, int]:
    """``(start digit s, count n)`` of a counting-task prompt.

    Raises:
        ValueError: the prompt is not ``[BOS, digits.., LEN_n, s]``.
    """
    p = list(prompt)
    ok = (len(p) >= 3 and p[0] == BOS and 0 <= p[-1] < NUM_DIGITS and p[-2] > _LEN_BASE
          and all(0 <= d < NUM_DIGITS for d in p[1:-2]))
    if not ok:
        raise ValueError(f"not a counting-task prompt [BOS, digits.., LEN_n, s]: {p}")
    return p[-1], p[-2] - _LEN_BASE


def target_response(prompt: Sequence[int]) -> list[int]:
    """The unique full-reward response: ``n`` digits counting on from ``s``, then EOS."""
    start, n = parse_prompt(prompt)
    return [(start + i) % NUM_DIGITS for i in range(1, n + 1)] + [EOS]


def reward(prompt: Sequence[int], response: Sequence[int]) -> float:
    """Partial-credit reward in ``[0, 1]`` (formula in the module docstring)."""
    start, n = parse_prompt(prompt)
    resp = list(response)
    body = resp[: resp.index(EOS)] if EOS in resp else resp
    is_digit = sum(1 for a in body[:n] if 0 <= a < NUM_DIGITS)
    prev = [start] + body[: n - 1]
    steps = sum(1 for p, a in zip(prev, body[:n]) if 0 <= p < NUM_DIGITS and a == (p + 1) % NUM_DIGITS)
    stopped = resp == target_response(prompt)
    return (FORMAT_CREDIT * is_digit + STEP_CREDIT * steps) / n + STOP_CREDIT * float(stopped)
