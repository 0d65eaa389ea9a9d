"""Up-front checks of the trainer's inputs: YAML values, number flags, model shapes, rollout rows, and
:class:`TrainerArgsError`, the error all of them raise (:mod:`.arguments` and :mod:`.hf_args` build on this
module, never the other way round).

Everything here runs before the model is built or the first step starts, on every rank with the same
inputs, so a bad value raises the same :class:`TrainerArgsError` on every rank and no rank is left inside
a collective. Each message names the option (its flag or YAML key)
and the accepted values. ``docs/reliability.md`` lists what is checked where.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Optional, Sequence

from megatron_rl_agg.core.validate import positive_int

__all__ = ["TrainerArgsError", "yaml_value", "check_number_flags", "positive_flag", "check_positive_flags",
           "check_model_shapes", "check_rollout_rows", "FLOAT_RANGES"]

_BOOL_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)

# Range of each float flag of the trainer: (low, low included, high, high included). Every float flag,
# listed here or not, must be finite; the loss and advantage flags are checked by their dataclasses.
FLOAT_RANGES = {
    "lr": (0.0, True, math.inf, False),
    "weight_decay": (0.0, True, math.inf, False),
    "adam_beta1": (0.0, True, 1.0, False),
    "adam_beta2": (0.0, True, 1.0, False),
    "adam_eps": (0.0, False, math.inf, False),
    "clip_grad": (0.0, True, math.inf, False),
    "rollout_failure_prob": (0.0, True, 1.0, False),
    "distributed_timeout_minutes": (0.0, False, math.inf, False),
    "reward_timeout": (0.0, False, math.inf, False),
    "max_reward_failure_frac": (0.0, True, 1.0, True),
}


class TrainerArgsError(ValueError):
    """A combination of trainer options that cannot work (the message names the flags)."""


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def positive_flag(value: Any, flag: str, must: str = "a positive integer") -> None:
    """:func:`megatron_rl_agg.core.validate.positive_int` with the trainer's wording and error:
    ``"<flag> must be <must>, got <value!r>"``."""
    positive_int(value, flag, must=must, error=TrainerArgsError)


def check_positive_flags(args: argparse.Namespace, *dests: str) -> None:
    """Each option ``dests`` (argparse dest names) a positive integer, named by its flag."""
    for dest in dests:
        positive_flag(getattr(args, dest), _flag(dest))


def yaml_value(path: str, action: argparse.Action, key: Any, value: Any) -> Any:
    """``value`` of YAML key ``key`` type-checked against its option, converted like a CLI value.

    A boolean option takes YAML ``true`` / ``false`` only (a quoted ``"false"`` is a non-empty string,
    truthy in Python: refused); an int option an int (not a float, not a bool); a float option a
    number or a numeric string (YAML reads ``1e-3`` as a string); other options a string.

    Args:
        key: the key as written in the file (``use-distributed-optimizer``), named in every error.

    Raises:
        TrainerArgsError: naming the file, the key, the value and what the option accepts.
    """
    where = f"{path}: {key}={value!r}"
    if isinstance(action, _BOOL_ACTIONS):
        if not isinstance(value, bool):
            raise TrainerArgsError(f"{where} ({type(value).__name__}) for a boolean option; write true or "
                                   "false without quotes")
        return value
    if value is None:
        if action.default is not None:
            raise TrainerArgsError(f"{where}: the option needs a value (default {action.default!r})")
        return None
    if action.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainerArgsError(f"{where} ({type(value).__name__}) for an integer option; write a whole "
                                   "number such as 4")
    elif action.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TrainerArgsError(f"{where} ({type(value).__name__}) for a number option")
        try:
            value = float(value)
        except ValueError:
            raise TrainerArgsError(f"{where} is not a number") from None
    else:
        if not isinstance(value, str):
            raise TrainerArgsError(f"{where} ({type(value).__name__}) for a text option; quote it")
        if action.type is not None and action.type is not str:
            try:
                value = action.type(value)
            except (argparse.ArgumentTypeError, ValueError) as err:
                raise TrainerArgsError(f"{where}: {err}") from None
    if action.choices is not None and value not in action.choices:
        raise TrainerArgsError(f"{where} is not one of {list(action.choices)}")
    return value


def _in_range(value: float, spec: tuple) -> bool:
    low, low_in, high, high_in = spec
    above = value >= low if low_in else value > low
    below = value <= high if high_in else value < high
    return above and below


def _describe(spec: tuple) -> str:
    low, low_in, high, high_in = spec
    return f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def check_number_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every float option finite, the trainer's own ones in :data:`FLOAT_RANGES`.

    NaN compares false with everything, so ``value < 0`` alone lets ``--kl-coef nan`` through; the test
    here is ``math.isfinite`` first, then the range.
    """
    for action in parser._actions:
        if action.type is not float:
            continue
        value = getattr(args, action.dest, None)
        if value is None:
            continue
        flag = action.option_strings[0] if action.option_strings else _flag(action.dest)
        if not math.isfinite(value):
            raise TrainerArgsError(f"{flag} must be a finite number, got {value!r}")
        spec = FLOAT_RANGES.get(action.dest)
        if spec is not None and not _in_range(value, spec):
            raise TrainerArgsError(f"{flag} must be in {_describe(spec)}, got {value!r}")


def check_model_shapes(args: argparse.Namespace) -> None:
    """Sizes of the GPT model that Megatron would reject deep inside model construction (or accept and
    build wrongly), named by their flags."""
    tp = args.tensor_model_parallel_size
    if args.hidden_size % args.num_attention_heads:
        raise TrainerArgsError(f"--hidden-size {args.hidden_size} must be a multiple of "
                               f"--num-attention-heads {args.num_attention_heads} (the head width)")
    if args.num_attention_heads % tp:
        raise TrainerArgsError(f"--num-attention-heads {args.num_attention_heads} must be a multiple of "
                               f"--tensor-model-parallel-size {tp} (heads are split over TP ranks)")
    ffn = args.ffn_hidden_size
    if ffn is not None:
        positive_flag(ffn, "--ffn-hidden-size", "a positive integer (or unset: 4 x --hidden-size)")
    if (ffn or 4 * args.hidden_size) % tp:
        raise TrainerArgsError(f"--ffn-hidden-size {ffn or 4 * args.hidden_size} must be a multiple of "
                               f"--tensor-model-parallel-size {tp}")


def check_rollout_rows(samples: Sequence, seq_length: int, path: Optional[str] = None) -> None:
    """Every row of a rollout file fits ``--seq-length``: checked over the whole file before step 1, so a
    long row in a late mini-batch does not end a run hours in (the message names its file and line)."""
    limit = seq_length + 1
    for s in samples:
        n = len(s.prompt) + len(s.response)
        if n > limit:
            raise TrainerArgsError(f"{s.source or path}: prompt + response = {n} tokens exceed --seq-length "
                                   f"{seq_length} + 1; raise --seq-length or drop the row")
