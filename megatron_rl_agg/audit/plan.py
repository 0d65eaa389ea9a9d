"""Validated ``check-invariance`` settings shared by the launcher and the workers: the defaults, the mode
list, :class:`_Plan` (every flag checked before any process starts), the loss configuration of a mode and
the audited model's :class:`~megatron_rl_agg.mcore.spec.GPTSpec`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from typing import Sequence

from megatron_rl_agg.core.aggregation import LOSS_AGGREGATIONS, resolve_aggregation
from megatron_rl_agg.core.config import MICROBATCH_MEAN, LossConfig, resolve_term_aggregation
from megatron_rl_agg.core.policy_losses import POLICY_LOSSES, SEQUENCE, get_policy_loss
from megatron_rl_agg.mcore.spec import GPTSpec
from megatron_rl_agg.parallel.layout import parse_layouts
from megatron_rl_agg.core.validate import positive_int

__all__ = ["AUDIT_BUGS", "DEFAULT_LAYOUTS"]

AUDIT_BUGS = ("kl_times_microbatches", "local_token_count", "cp_token_count", "cp_shard_sequence_ratio",
              "is_microbatch_normalization")
# Bounds of the audited importance-weight treatments: the audit's behaviour log-probs differ from the
# proximal ones by 0.2 x N(0, 1) per token, so token ratios straddle both bounds (and sequence ratios more so).
IS_BOUNDS = (0.8, 1.2)
DEFAULT_LAYOUTS = "m1,m4,dp2+m2,tp2+m2,pp2+m4,pp2+vpp2+m4"
SAME = "same"


def _resolve_modes(names: Sequence[str]) -> list[str]:
    if any(n.strip().lower() == "all" for n in names):
        return list(LOSS_AGGREGATIONS)
    modes: list[str] = []
    for name in names:
        for piece in re.split(r"[\s,;]+", name.strip()):
            if piece and resolve_aggregation(piece) not in modes:
                modes.append(resolve_aggregation(piece))
    if not modes:
        raise ValueError(f"--modes: no mode given in {list(names)!r}; valid: all, {', '.join(LOSS_AGGREGATIONS)}")
    return modes


def _resolve_policy_losses(names: Sequence[str]) -> list[str]:
    """The ``--policy-loss`` list (separated by ',', ';' or spaces; 'all' for every registered loss), each
    name resolved by the registry's lookup (aliases accepted; an unknown name lists the valid ones)."""
    if any(n.strip().lower() == "all" for n in names):
        return list(POLICY_LOSSES)
    losses: list[str] = []
    for name in names:
        for piece in re.split(r"[\s,;]+", name.strip()):
            if not piece:
                continue
            try:
                loss = get_policy_loss(piece).name
            except ValueError as err:
                raise ValueError(f"--policy-loss: {err}") from None
            if loss not in losses:
                losses.append(loss)
    if not losses:
        raise ValueError(f"--policy-loss: no loss given in {list(names)!r}; valid: all, "
                         f"{', '.join(POLICY_LOSSES)}")
    return losses


def _pairs(losses: Sequence[str], modes: Sequence[str],
           explicit_modes: bool, horizon: int) -> tuple[list, list]:
    """``(pairs, refused)``: the audited ``(loss, mode)`` pairs and ``"loss x mode: reason"`` for each
    combination ``LossConfig`` refuses (a sequence-level loss with a length-weighting mode). A refused
    combination is an error when the user named the modes, a listed skip under ``--modes all``."""
    pairs, refused = [], []
    for loss in losses:
        for mode in modes:
            try:
                LossConfig(loss_aggregation=mode, policy_loss=loss, max_response_length=horizon)
            except ValueError as err:
                if explicit_modes:
                    raise ValueError(f"--policy-loss {loss} with --modes {mode}: {err}") from None
                refused.append(f"{loss} x {mode}: {err}")
                continue
            pairs.append((loss, mode))
    return pairs, refused


@dataclasses.dataclass(kw_only=True)
class _Plan:
    """Validated audit settings shared by the launcher and the workers."""

    layouts: list
    modes: list
    policy_losses: list
    pairs: list
    """``(policy loss, mode)`` pairs audited, losses in ``--policy-loss`` order."""
    refused: list
    """``"loss x mode: reason"`` of the combinations skipped under ``--modes all``."""
    tolerance: float
    kl_aggregation: str
    entropy_aggregation: str
    max_response_length: int
    is_level: str = "off"
    is_mode: str = "truncate"
    is_self_normalize: bool = False


def _plan(args: argparse.Namespace) -> _Plan:
    """Validate every flag before any process is started (a worker error would strand its peers)."""
    layouts = parse_layouts(args.layouts)
    modes = _resolve_modes(args.modes)
    losses = _resolve_policy_losses(args.policy_loss)
    for flag in ("kl_aggregation", "entropy_aggregation"):
        value = getattr(args, flag)
        if value.strip().lower() != SAME:
            resolve_term_aggregation(value, "--" + flag.replace("_", "-"))
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length",
                 "batch_size"):
        positive_int(getattr(args, flag), f"--{flag.replace('_', '-')}", must=">= 1")
    if args.seq_length < 4:
        raise ValueError(f"--seq-length must be >= 4 (prompt + response), got {args.seq_length}")
    for flag in ("kl_coef", "entropy_coef"):      # NaN fails every comparison: test finiteness first
        if not (math.isfinite(getattr(args, flag)) and getattr(args, flag) >= 0):
            raise ValueError(f"--{flag.replace('_', '-')} must be a finite number >= 0, "
                             f"got {getattr(args, flag)}")
    if args.inject_bug == "kl_times_microbatches" and args.kl_coef == 0:
        raise ValueError("--inject-bug kl_times_microbatches scales the KL term: it needs --kl-coef > 0")
    sequence_level = [n for n in POLICY_LOSSES if POLICY_LOSSES[n].level == SEQUENCE]
    if args.inject_bug == "cp_shard_sequence_ratio" and not set(losses) & set(sequence_level):
        raise ValueError("--inject-bug cp_shard_sequence_ratio corrupts the per-sequence ratio of a "
                         f"sequence-level loss: add one of {', '.join(sequence_level)} to --policy-loss "
                         f"(got {', '.join(losses)})")
    is_level, is_mode = args.is_level, args.is_mode
    if is_level == "off" and (is_mode is not None or args.is_self_normalize):
        raise ValueError("--is-mode and --is-self-normalize need --is-level token, sequence or geometric (the "
                         "off-policy correction is off)")
    if args.inject_bug == "is_microbatch_normalization" and (is_level == "off" or not args.is_self_normalize):
        raise ValueError("--inject-bug is_microbatch_normalization corrupts the self-normalization of the "
                         "importance weights: it needs --is-level token, sequence or geometric and "
                         "--is-self-normalize")
    tolerance = args.tolerance if args.tolerance is not None else (5e-2 if args.bf16 else 1e-4)
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"--tolerance must be > 0, got {tolerance}")
    spec = _model_spec(args)          # the GPTSpec checks (top-k, dispatcher) before any process starts
    for lay in layouts:
        name = str(lay)
        rows = lay.data_parallel_size * lay.num_microbatches
        if args.batch_size % rows:
            factors = "dp*ep*m" if lay.ep > 1 else "dp*m"
            raise ValueError(
                f"layout {name}: --batch-size {args.batch_size} is not divisible by {factors} = {rows}")
        if getattr(args, "moe_routing_replay", "off") != "off" and spec.num_experts is None:
            raise ValueError(f"--moe-routing-replay {args.moe_routing_replay} needs an MoE model; set --num-experts")
        if lay.ep > 1 and spec.num_experts is None:
            raise ValueError(f"layout {name}: ep{lay.ep} needs an MoE model; set --num-experts")
        if spec.num_experts is not None and spec.num_experts % lay.ep:
            raise ValueError(f"layout {name}: --num-experts {spec.num_experts} is not divisible by "
                             f"ep = {lay.ep}")
        if spec.num_experts is not None and lay.cp > 1:
            raise ValueError(f"layout {name}: MoE with cp > 1 is not supported here (MoE layers under context "
                             "parallelism are not tested); audit MoE models at cp1")
        if spec.num_experts is not None and lay.tp > 1 and args.seq_length % lay.tp:
            raise ValueError(f"layout {name}: MoE at tp = {lay.tp} runs sequence parallel; --seq-length "
                             f"{args.seq_length} must be divisible by tp")
        stages = lay.pp * (lay.vpp or 1)
        if args.num_layers % stages:
            raise ValueError(
                f"layout {name}: --num-layers {args.num_layers} is not divisible by pp*vpp = {stages}")
        if args.num_attention_heads % lay.tp or args.vocab_size % lay.tp:
            raise ValueError(
                f"layout {name}: --num-attention-heads {args.num_attention_heads} and --vocab-size "
                f"{args.vocab_size} must be divisible by tp = {lay.tp}")
        if args.seq_length % (2 * lay.cp):
            raise ValueError(
                f"layout {name}: --seq-length {args.seq_length} is not divisible by 2 * cp = {2 * lay.cp} "
                "(context parallelism splits every row into 2 * cp equal chunks)")
        if lay.vpp is not None and lay.num_microbatches % lay.pp:
            raise ValueError(
                f"layout {name}: the interleaved schedule needs m to be a multiple of pp = {lay.pp}")
    horizon = args.max_response_length if args.max_response_length is not None else args.seq_length
    positive_int(horizon, "--max-response-length", must=">= 1")
    explicit = not any(n.strip().lower() == "all" for n in args.modes)
    pairs, refused = _pairs(losses, modes, explicit, horizon)
    if not pairs:
        raise ValueError(f"no policy loss x mode pair to audit: {'; '.join(refused)}")
    return _Plan(layouts=layouts, modes=modes, policy_losses=losses, pairs=pairs, refused=refused,
                 tolerance=tolerance,
                 kl_aggregation=args.kl_aggregation.strip().lower(),
                 entropy_aggregation=args.entropy_aggregation.strip().lower(), max_response_length=horizon,
                 is_level=is_level, is_mode=is_mode or "truncate", is_self_normalize=bool(args.is_self_normalize))


def _term_mode(choice: str, mode: str) -> str:
    """Aggregation of a KL / entropy term when the policy term uses ``mode``."""
    if choice == SAME:
        return MICROBATCH_MEAN if mode == "token_mean_legacy" else mode
    return resolve_term_aggregation(choice)


def _loss_config(plan: _Plan, args: argparse.Namespace, mode: str, policy_loss: str = "ppo_clip") -> LossConfig:
    """The audited configuration of ``(policy_loss, mode)``: the loss's paper defaults for its parameters, and
    the off-policy correction of ``--is-level`` / ``--is-mode`` (bounds :data:`IS_BOUNDS`)."""
    return LossConfig(loss_aggregation=mode, policy_loss=policy_loss, max_response_length=plan.max_response_length,
                      kl_coef=args.kl_coef, kl_estimator=args.kl_estimator, entropy_coef=args.entropy_coef,
                      kl_aggregation=_term_mode(plan.kl_aggregation, mode),
                      entropy_aggregation=_term_mode(plan.entropy_aggregation, mode),
                      is_level=plan.is_level, is_mode=plan.is_mode, is_low=IS_BOUNDS[0], is_high=IS_BOUNDS[1],
                      is_self_normalize=plan.is_self_normalize)


def _model_spec(args: argparse.Namespace):
    """The audited GPT: dense, or MoE with ``--num-experts`` (no linear biases, aux loss off)."""
    moe = args.num_experts is not None
    return GPTSpec(num_layers=args.num_layers, hidden_size=args.hidden_size,
                   num_attention_heads=args.num_attention_heads, vocab_size=args.vocab_size,
                   max_seq_length=args.seq_length, bf16=args.bf16, add_bias_linear=not moe,
                   num_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
                   moe_token_dispatcher_type=args.moe_token_dispatcher_type)
