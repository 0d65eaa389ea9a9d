"""Rollout samples, the offline JSONL reader, and the split of a rollout stream into mini-batches.

One sample is one row: a prompt, the response sampled for it, its scalar reward and how generation
ended. Offline files hold one JSON object per line::

    {"prompt_id": "q17", "prompt": [10, 3, 15, 4], "response": [5, 6, 11], "reward": 1.0,
     "finish_reason": "stop", "logprobs": [-0.1, -0.2, -0.05]}

* ``prompt_id``: str or int; the rows of one prompt group are consecutive lines (a group may be partial,
  e.g. when the rollout service dropped samples), and an id may not reappear after another group.
* ``prompt``: non-empty list of token ids; ``response``: list of token ids (may be empty). With a tokenizer
  (``--tokenizer`` / ``--hf-checkpoint``) either may instead be text, tokenized as is (no special tokens
  added: a prompt carries its chat template already); ``logprobs`` then count the tokenizer's tokens.
* ``reward``: finite number; ``finish_reason``: ``"stop"`` (ended with EOS) or ``"length"`` (truncated).
* ``logprobs`` (optional): one finite log-probability in ``[-88, 0]`` per response token, from the policy
  that sampled it (below -88 the importance ratio overflows float32). Without it the trainer recomputes
  the old log-probs with the current model before the update, so the importance ratio of the first update
  is exactly 1.

Files are parsed with :func:`json.loads` only: nothing is executed or unpickled. Every bad line raises a
:class:`RolloutFormatError` naming the file, the line number and what is wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

__all__ = [
    "FINISH_REASONS",
    "Sample",
    "RolloutFormatError",
    "parse_rollout_line",
    "read_rollouts",
    "group_spans",
    "plan_minibatches",
]

FINISH_REASONS = ("stop", "length")
_REQUIRED = ("prompt_id", "prompt", "response", "reward", "finish_reason")
_OPTIONAL = ("logprobs",)

# Lowest behaviour log-prob accepted. The ratio exp(logp - old_logp) <= exp(-old_logp) (logp <= 0) is
# finite in float32 / bf16 only while -old_logp < log(3.4e38) = 88.72: a lower value makes an infinite
# ratio, hence a NaN loss, inevitable as soon as the current policy gives the token any real mass. A
# sampled token of probability below e^-88 (1e-38) does not occur: such a value means wrong units, a sign
# error or a masked position written as a large negative number.
MIN_LOGPROB = -88.0


@dataclass(frozen=True)
class Sample:
    """One rollout row (on-policy or offline)."""

    prompt_id: Union[str, int]
    """Group key: the rows sampled from one prompt share it."""
    prompt: tuple[int, ...]
    response: tuple[int, ...]
    reward: float
    finish_reason: str
    """``"stop"`` or ``"length"`` (truncated at the generation limit)."""
    logprobs: Optional[tuple[float, ...]] = None
    """Behaviour-policy log-probs of the response tokens, or None (recompute)."""
    source: str = ""
    """Where the row came from (``file:line``), for error messages."""
    reward_error: Optional[str] = None
    """Why the row has no reward (its ``--reward`` timed out, raised or was non-finite; ``reward`` is then
    NaN and the row is invalid: out of the group statistics and the loss), or None."""
    versions: Optional[tuple[int, ...]] = None
    """Policy version of each response token: optimizer steps applied to the weights that sampled it."""

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class RolloutFormatError(ValueError):
    """A rollout line that does not follow the format (message names the file and line)."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _token_list(obj: dict, key: str, vocab_size: Optional[int], allow_empty: bool,
                tokenize=None) -> tuple[int, ...]:
    toks = obj[key]
    if isinstance(toks, str):
        if tokenize is None:
            raise ValueError(f"{key!r} is text; text rollouts need a tokenizer (--tokenizer or --hf-checkpoint)")
        toks = list(tokenize(toks))
    if not isinstance(toks, list) or not all(_is_int(t) for t in toks):
        raise ValueError(f"{key!r} must be a list of ints, got {str(toks)[:80]}")
    if not toks and not allow_empty:
        raise ValueError(f"{key!r} must not be empty")
    hi = vocab_size if vocab_size is not None else float("inf")
    bad = [t for t in toks if not 0 <= t < hi]
    if bad:
        raise ValueError(f"{key!r} has token ids outside [0, {vocab_size}): {bad[:5]}")
    return tuple(toks)


def _sample_from_obj(obj, vocab_size: Optional[int], source: str, tokenize=None) -> Sample:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _REQUIRED if k not in obj]
    unknown = sorted(k for k in obj if k not in _REQUIRED + _OPTIONAL)
    if missing or unknown:
        raise ValueError(f"missing keys {missing}, unknown keys {unknown}; "
                         f"allowed: {', '.join(_REQUIRED + _OPTIONAL)}")
    pid = obj["prompt_id"]
    if not (isinstance(pid, str) or _is_int(pid)):
        raise ValueError(f"'prompt_id' must be a str or an int, got {pid!r}")
    prompt = _token_list(obj, "prompt", vocab_size, allow_empty=False, tokenize=tokenize)
    response = _token_list(obj, "response", vocab_size, allow_empty=True, tokenize=tokenize)
    if not _is_number(obj["reward"]):
        raise ValueError(f"'reward' must be a finite number, got {obj['reward']!r}")
    if obj["finish_reason"] not in FINISH_REASONS:
        raise ValueError(f"'finish_reason' must be one of {FINISH_REASONS}, got {obj['finish_reason']!r}")
    logprobs = obj.get("logprobs")
    if logprobs is not None:
        if not isinstance(logprobs, list) or not all(_is_number(x) and x <= 0 for x in logprobs):
            raise ValueError(f"'logprobs' must be a list of finite numbers <= 0, got {str(logprobs)[:80]}")
        low = [(i, x) for i, x in enumerate(logprobs) if x < MIN_LOGPROB]
        if low:
            i, x = low[0]
            raise ValueError(f"'logprobs'[{i}] = {x!r} is below {MIN_LOGPROB}: the importance ratio "
                             f"exp(logp - old_logp) would overflow float32 (exp(88.7) is its largest "
                             f"value); behaviour log-probs must be natural-log probabilities of the "
                             f"sampled tokens ({len(low)} such value(s) on this line)")
        if len(logprobs) != len(response):
            raise ValueError(f"'logprobs' has {len(logprobs)} entries for {len(response)} response tokens")
        logprobs = tuple(float(x) for x in logprobs)
    return Sample(pid, prompt, response, float(obj["reward"]), obj["finish_reason"], logprobs, source)


def parse_rollout_line(line: str, source: str, vocab_size: Optional[int] = None, tokenize=None) -> Sample:
    """Parse one JSONL line; ``source`` (e.g. ``"file.jsonl:12"``) prefixes every error message.

    ``tokenize`` (text -> token ids) turns a text ``prompt`` / ``response`` into tokens."""
    try:
        return _sample_from_obj(json.loads(line), vocab_size, source, tokenize)
    except json.JSONDecodeError as err:
        raise RolloutFormatError(f"{source}: invalid JSON ({err.msg} at column {err.colno})") from None
    except ValueError as err:
        raise RolloutFormatError(f"{source}: {err}") from None


def read_rollouts(path: str, vocab_size: Optional[int] = None, tokenize=None) -> list[Sample]:
    """All samples of a JSONL rollout file (blank lines skipped), groups checked for contiguity.

    ``tokenize`` (text -> token ids, e.g. a Hugging Face tokenizer without special tokens) lets
    ``prompt`` and ``response`` be strings.

    Raises:
        RolloutFormatError: a bad line (file and line number in the message), a prompt id that
            reappears after another group, or a file with no samples.
    """
    samples = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                samples.append(parse_rollout_line(line, f"{path}:{lineno}", vocab_size, tokenize))
    if not samples:
        raise RolloutFormatError(f"{path}: no samples (the file is empty)")
    group_spans(samples)
    return samples


def group_spans(samples: Sequence[Sample]) -> list[tuple[int, int]]:
    """``[(start, end), ..]`` of the runs of equal ``prompt_id`` (one run per prompt group).

    Raises:
        RolloutFormatError: a prompt id whose rows are not consecutive.
    """
    spans, seen = [], {}
    for i, s in enumerate(samples):
        if spans and samples[spans[-1][0]].prompt_id == s.prompt_id:
            spans[-1][1] = i + 1
            continue
        if s.prompt_id in seen:
            first = samples[seen[s.prompt_id]]
            raise RolloutFormatError(
                f"{s.source}: prompt_id {s.prompt_id!r} reappears after another group (first group at "
                f"{first.source}); the rows of one prompt group must be consecutive lines")
        seen[s.prompt_id] = i
        spans.append([i, i + 1])
    return [(a, b) for a, b in spans]


def plan_minibatches(spans: Iterable[tuple[int, int]], max_rows: int) -> list[tuple[int, int]]:
    """Pack whole groups, in order, into row ranges of at most ``max_rows`` rows (greedy).

    A group never straddles two mini-batches, so its advantage statistics are complete within one
    optimizer step.

    Raises:
        ValueError: a group larger than ``max_rows`` (raise --global-batch-size).
    """
    batches: list[tuple[int, int]] = []
    for a, b in spans:
        if b - a > max_rows:
            raise ValueError(f"a prompt group of {b - a} rows (rows {a}..{b - 1}) does not fit a mini-batch "
                             f"of --global-batch-size {max_rows} rows; raise --global-batch-size")
        if batches and b - batches[-1][0] <= max_rows:
            batches[-1] = (batches[-1][0], b)
        else:
            batches.append((a, b))
    return batches
