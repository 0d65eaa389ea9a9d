"""The invariance audit behind ``megatron-rl-agg check-invariance``.

One real Megatron-Core GPT model, one fixed RL mini-batch and the same initial weights are run through
one forward-backward in several parallel layouts, for each loss-aggregation mode. Every gradient is
compared with a single-process reference computed from the DEFINITION of the mode
(:func:`megatron_rl_agg.core.aggregation.aggregate` on full-vocabulary log-probs, plain autograd, no
Megatron schedule, no DDP, no global weights), and the audit prints a mode x layout table of the largest
relative gradient difference with PASS/FAIL at a tolerance. Exit status: 0 all PASS, 1 any FAIL,
2 bad arguments or nothing could run.

Launching (see docs/audit.md)::

    megatron-rl-agg check-invariance                     # CPU or GPUs: re-launches itself under torchrun,
                                                         # one launch per process count the layouts need
    torchrun --nproc-per-node 2 -m megatron_rl_agg.cli check-invariance --layouts "dp2+m2 tp2 pp2vpp2m4"
                                                         # already under torchrun (world size W): runs
                                                         # the layouts that need exactly W processes

Layout grammar. A layout is a list of factors ``dp<N>``, ``tp<N>``, ``pp<N>``, ``vpp<N>`` (virtual
stages per pipeline rank), ``cp<N>`` (context parallelism: each row split into ``2 N`` zigzag chunks),
``ep<N>`` (expert parallelism, needs ``--num-experts``) and ``m<N>`` (micro-batches per DP rank), each at
most once, written together
(``pp2vpp2m4``) or joined by ``+`` (``pp2+vpp2+m4``); omitted factors are 1 (no virtual stages), except
``m`` with virtual stages, which defaults to ``pp`` (the interleaved schedule needs a multiple of ``pp``).
Layouts are separated by ``,``, ``;`` or whitespace, inside one ``--layouts`` value or across several:
``--layouts dp2,m4,tp2,pp2,pp2vpp2`` is five layouts; ``cp2 cp2+dp2 cp2+tp2 cp2+pp2`` are four CP
layouts. A layout needs ``dp * tp * pp * cp * ep`` processes: the factors multiply, so ``ep2+dp2`` is 4
processes, each expert on one of 2 EP ranks and replicated on 2 (Megatron's data-parallel size, over
which rows are split, is ``dp * ep``). ``--calculate-per-token-loss`` runs every layout with Megatron's
``calculate_per_token_loss=True`` (the loss returns its 3-tuple).

MoE (``--num-experts N``, top-k routing with ``--moe-router-topk``, ``--moe-token-dispatcher-type``):
every MLP is a Megatron MoE layer; the aux load-balancing loss is off, because it is Megatron's own
per-micro-batch term and not part of the plugin's loss (tests/megatron/test_moe_grads.py checks it).

What a row checks. The loss is the plugin's full RL loss: PPO clipped policy gradient + ``kl_coef`` x KL
- ``entropy_coef`` x entropy, all three with gradient. By default KL and entropy are aggregated with the
audited mode too (``--kl-aggregation same``), so the whole objective is layout-independent and the
reference is one gradient per mode. ``token_mean_legacy`` and ``microbatch_mean`` terms are
per-micro-batch means BY DEFINITION; their reference uses the layout's micro-batch split (the mean over
the ``dp * m`` micro-batches of each micro-batch's token mean), so a PASS there means "Megatron's plain
averaging, reproduced exactly", not "independent of the layout".

Self-test (``--inject-bug``). Deliberately wrong correction factors, to show the audit catches them:

* ``kl_times_microbatches``: the KL term of every micro-batch is multiplied by the number of
  micro-batches ``m`` (as if the policy term's ``M * D`` factor were also applied to a term already
  averaged by Megatron). Layouts with ``m > 1`` must FAIL (when ``--kl-coef`` > 0).
* ``local_token_count``: the global weights are computed from this DP rank's counts only (tokens, live
  rows, group sizes of the rank) instead of the counts summed over the DP group. Layouts with ``dp > 1``
  must FAIL for every mode that has a global count (all but ``token_sum``, ``token_mean_legacy``).
* ``cp_token_count``: the global weights are counted over the dp x cp group instead of the DP group
  (every CP rank of a DP rank holds the same full rows, so each row is counted ``cp`` times). Layouts with
  ``cp > 1`` must FAIL for every mode that has a global count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

import torch

from megatron_rl_agg.core.aggregation import LOSS_AGGREGATIONS, aggregate, get_aggregation, resolve_aggregation
from megatron_rl_agg.core.config import KL_ESTIMATORS, MICROBATCH_MEAN, LossConfig, resolve_term_aggregation
from megatron_rl_agg.mcore.model import MOE_TOKEN_DISPATCHERS, Layout, parse_layout

__all__ = [
    "AUDIT_BUGS",
    "DEFAULT_LAYOUTS",
    "parse_layouts",
    "layout_name",
    "add_audit_args",
    "check_invariance",
    "make_batch",
    "relative_grad_diff",
    "format_table",
    "exit_status",
]

AUDIT_BUGS = ("kl_times_microbatches", "local_token_count", "cp_token_count")
DEFAULT_LAYOUTS = "m1,m4,dp2+m2,tp2+m2,pp2+m4,pp2+vpp2+m4"
SAME = "same"
PASS, FAIL = "PASS", "FAIL"

_FACTOR = re.compile(r"(vpp|dp|tp|pp|cp|ep|m)(\d+)")
_LAYOUT_SEPARATORS = re.compile(r"[\s;,]+")


# ----------------------------------------------------------------------------------------------
# layout grammar
# ----------------------------------------------------------------------------------------------

def _parse_one(text: str) -> Layout:
    """One layout: factors written together or joined by '+' (see the module docstring)."""
    compact = text.lower().replace("+", "")
    pos, items = 0, []
    while pos < len(compact):
        match = _FACTOR.match(compact, pos)
        if match is None:
            raise ValueError(
                f"bad layout {text!r} at {compact[pos:]!r}: a layout is factors dp<N>, tp<N>, pp<N>, "
                "vpp<N>, cp<N>, ep<N>, m<N> written together or joined by '+' (e.g. 'dp2+m4', 'tp2', "
                "'pp2vpp2m4', 'ep2+dp2'); "
                "separate layouts with ',', ';' or spaces")
        items.append(match.group(0))
        pos = match.end()
    if not items:
        raise ValueError(f"empty layout in {text!r}")
    keys = [_FACTOR.match(i).group(1) for i in items]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(
            f"layout {text!r} sets {', '.join(repeated)} more than once; to give several layouts separate "
            "them with ',', ';' or spaces (e.g. 'dp2,m4,tp2,pp2,pp2vpp2')")
    if "vpp" in keys and "pp" in keys and "m" not in keys:
        # Megatron's interleaved schedule needs a multiple of pp micro-batches: with m omitted, take the
        # smallest such count (pp) rather than the usual default of 1.
        items.append("m" + _FACTOR.match(items[keys.index("pp")]).group(2))
    return parse_layout(",".join(items))


def parse_layouts(texts: Sequence[str] | str) -> list[Layout]:
    """Parse ``--layouts`` values (each may hold several layouts) into Layouts, duplicates removed.

    Examples: ``"dp2+m4 tp2"``, ``"pp2vpp2m4;dp2+m2"``, ``["m4", "tp2+m2"]``.

    Raises:
        ValueError: naming the bad layout text and the grammar.
    """
    if isinstance(texts, str):
        texts = [texts]
    layouts: list[Layout] = []
    for text in texts:
        for piece in _LAYOUT_SEPARATORS.split(text.strip()):
            if piece:
                layout = _parse_one(piece)
                if layout not in layouts:
                    layouts.append(layout)
    if not layouts:
        raise ValueError(f"no layout given in {list(texts)!r}")
    return layouts


def layout_name(layout: Layout) -> str:
    """Short canonical spelling: only the factors that differ from 1, e.g. ``pp2+vpp2+m4``; ``m1`` alone."""
    parts = [f"{k}{v}" for k, v in (("ep", layout.ep), ("cp", layout.cp), ("dp", layout.dp), ("tp", layout.tp),
                                     ("pp", layout.pp)) if v != 1]
    if layout.vpp is not None:
        parts.append(f"vpp{layout.vpp}")
    if layout.num_microbatches != 1 or not parts:
        parts.append(f"m{layout.num_microbatches}")
    return "+".join(parts)


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------

def add_audit_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``check-invariance`` flags (model size, batch, loss, layouts, modes, tolerance, self-test)."""
    g = parser.add_argument_group("what to check")
    g.add_argument("--layouts", nargs="+", default=[DEFAULT_LAYOUTS], metavar="LAYOUT",
                   help="layouts separated by ',', ';' or spaces; a layout is dp<N>, tp<N>, pp<N>, vpp<N>, "
                        "cp<N>, ep<N> (needs --num-experts), m<N> written together or joined by '+', e.g. "
                        "'dp2+m4,tp2,pp2vpp2m4,cp2+dp2,ep2+dp2' "
                        f"(default: {DEFAULT_LAYOUTS})")
    g.add_argument("--modes", nargs="+", default=["all"], metavar="MODE",
                   help="aggregation modes (aliases accepted) or 'all' (default): "
                        + ", ".join(LOSS_AGGREGATIONS))
    g.add_argument("--tolerance", type=float, default=None,
                   help="largest relative gradient difference that passes "
                        "(default 1e-4, or 5e-2 with --bf16)")
    g.add_argument("--inject-bug", choices=AUDIT_BUGS, default=None,
                   help="SELF-TEST OF THE AUDIT ONLY: inject a wrong correction factor and expect FAIL rows "
                        "(kl_times_microbatches: layouts with m > 1; local_token_count: layouts with dp > 1; "
                        "cp_token_count: layouts with cp > 1)")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="run every layout with Megatron's calculate_per_token_loss=True (the loss returns "
                        "the 3-tuple (loss, num_tokens, report))")
    g.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON here")
    m = parser.add_argument_group("model (tiny by default; raise for a real model on GPUs)")
    m.add_argument("--num-layers", type=int, default=4, help="must be divisible by pp * vpp of every layout")
    m.add_argument("--hidden-size", type=int, default=64)
    m.add_argument("--num-attention-heads", type=int, default=4, help="must be divisible by every tp")
    m.add_argument("--vocab-size", type=int, default=128, help="must be divisible by every tp")
    m.add_argument("--seq-length", type=int, default=32)
    m.add_argument("--bf16", action="store_true", help="bf16 parameters (fp32 gradients); GPUs")
    m.add_argument("--num-experts", type=int, default=None,
                   help="MoE: experts per layer (every MLP a Megatron MoE layer, no linear biases, aux loss "
                        "off); needed by ep<N> layouts and divisible by every ep")
    m.add_argument("--moe-router-topk", type=int, default=2, help="MoE: experts per token")
    m.add_argument("--moe-token-dispatcher-type", choices=MOE_TOKEN_DISPATCHERS, default="alltoall",
                   help="MoE: token dispatcher")
    b = parser.add_argument_group("batch and loss")
    b.add_argument("--batch-size", type=int, default=16,
                   help="rows of the mini-batch; divisible by dp * m of every layout")
    b.add_argument("--seed", type=int, default=1234, help="seed of the weights and of the batch")
    b.add_argument("--kl-coef", type=float, default=0.1)
    b.add_argument("--kl-estimator", choices=KL_ESTIMATORS, default="k3")
    b.add_argument("--entropy-coef", type=float, default=0.01)
    b.add_argument("--kl-aggregation", default=SAME,
                   help="'same' (default: the audited mode; microbatch_mean for token_mean_legacy), "
                        "microbatch_mean, or a mode name")
    b.add_argument("--entropy-aggregation", default=SAME, help="as --kl-aggregation")
    b.add_argument("--max-response-length", type=int, default=None,
                   help="L of seq_mean_token_sum_norm (default: --seq-length)")
    return parser


def _resolve_modes(names: Sequence[str]) -> list[str]:
    if any(n.strip().lower() == "all" for n in names):
        return list(LOSS_AGGREGATIONS)
    modes: list[str] = []
    for name in names:
        for piece in re.split(r"[\s,;]+", name.strip()):
            if piece and resolve_aggregation(piece) not in modes:
                modes.append(resolve_aggregation(piece))
    return modes


@dataclasses.dataclass(kw_only=True)
class _Plan:
    """Validated audit settings shared by the launcher and the workers."""

    layouts: list
    modes: list
    tolerance: float
    kl_aggregation: str
    entropy_aggregation: str
    max_response_length: int


def _plan(args: argparse.Namespace) -> _Plan:
    """Validate every flag before any process is started (a worker error would strand its peers)."""
    layouts = parse_layouts(args.layouts)
    modes = _resolve_modes(args.modes)
    for flag in ("kl_aggregation", "entropy_aggregation"):
        value = getattr(args, flag)
        if value.strip().lower() != SAME:
            resolve_term_aggregation(value, "--" + flag.replace("_", "-"))
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length",
                 "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.seq_length < 4:
        raise ValueError(f"--seq-length must be >= 4 (prompt + response), got {args.seq_length}")
    for flag in ("kl_coef", "entropy_coef"):      # NaN fails every comparison: test finiteness first
        if not (math.isfinite(getattr(args, flag)) and getattr(args, flag) >= 0):
            raise ValueError(f"--{flag.replace('_', '-')} must be a finite number >= 0, "
                             f"got {getattr(args, flag)}")
    if args.inject_bug == "kl_times_microbatches" and args.kl_coef == 0:
        raise ValueError("--inject-bug kl_times_microbatches scales the KL term: it needs --kl-coef > 0")
    tolerance = args.tolerance if args.tolerance is not None else (5e-2 if args.bf16 else 1e-4)
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"--tolerance must be > 0, got {tolerance}")
    spec = _model_spec(args)          # the GPTSpec checks (top-k, dispatcher) before any process starts
    for lay in layouts:
        name = layout_name(lay)
        rows = lay.data_parallel_size * lay.num_microbatches
        if args.batch_size % rows:
            factors = "dp*ep*m" if lay.ep > 1 else "dp*m"
            raise ValueError(
                f"layout {name}: --batch-size {args.batch_size} is not divisible by {factors} = {rows}")
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
    if horizon < 1:
        raise ValueError(f"--max-response-length must be >= 1, got {horizon}")
    return _Plan(layouts=layouts, modes=modes, tolerance=tolerance,
                 kl_aggregation=args.kl_aggregation.strip().lower(),
                 entropy_aggregation=args.entropy_aggregation.strip().lower(), max_response_length=horizon)


def _term_mode(choice: str, mode: str) -> str:
    """Aggregation of a KL / entropy term when the policy term uses ``mode``."""
    if choice == SAME:
        return MICROBATCH_MEAN if mode == "token_mean_legacy" else mode
    return resolve_term_aggregation(choice)


def _loss_config(plan: _Plan, args: argparse.Namespace, mode: str) -> LossConfig:
    return LossConfig(loss_aggregation=mode, max_response_length=plan.max_response_length,
                      kl_coef=args.kl_coef, kl_estimator=args.kl_estimator, entropy_coef=args.entropy_coef,
                      kl_aggregation=_term_mode(plan.kl_aggregation, mode),
                      entropy_aggregation=_term_mode(plan.entropy_aggregation, mode))


# ----------------------------------------------------------------------------------------------
# the fixed mini-batch
# ----------------------------------------------------------------------------------------------

def make_batch(*, batch_size: int, seq_length: int, vocab_size: int, seed: int) -> dict:
    """A deterministic RL mini-batch that exercises every count the modes depend on.

    Rows hold a prompt (2 to S/4 tokens) and a response of 1 to ``S - prompt`` tokens, so token counts per
    row, micro-batch and rank all differ. Prompt groups (1 to 5 rows, stretched where needed) straddle
    the rank boundaries of dp2 and dp4 splits; one row is fully masked inside the largest live group and
    the last group is fully masked (dead rows and a dead group must not count). Advantages are group-normalized rewards.

    Returns (CPU tensors): ``tokens``, ``labels``, ``loss_mask`` ``[B, S]``; ``advantages`` ``[B]``;
    ``group_ids`` ``[B]`` int64; ``group_sizes`` (list of ints).
    """
    from megatron_rl_agg.core.advantages import normalize_advantages

    gen = torch.Generator().manual_seed(seed)
    B, S = batch_size, seq_length
    tokens = torch.randint(0, vocab_size, (B, S), generator=gen)
    labels = torch.cat([tokens[:, 1:], torch.zeros(B, 1, dtype=tokens.dtype)], dim=1)   # next token
    loss_mask = torch.zeros(B, S, dtype=torch.int64)
    for i in range(B):
        prompt = int(torch.randint(2, max(3, S // 4 + 1), (1,), generator=gen))
        response = int(torch.randint(1, S - prompt + 1, (1,), generator=gen))
        # label position t predicts token t + 1: the response tokens [prompt, prompt + response).
        loss_mask[i, prompt - 1: prompt - 1 + response] = 1
    # Group sizes 1..5, stretched so that no group ends exactly at B/4, B/2 or 3B/4: at dp2 / dp4 (and
    # many micro-batch splits) some group continues on the next rank or micro-batch.
    cuts = {B // 4, B // 2, 3 * B // 4} - {0, B}
    sizes, start = [], 0
    while start < B:
        size = min(B - start, int(torch.randint(1, 6, (1,), generator=gen)))
        while start + size in cuts:
            size += 1
        sizes.append(size)
        start += size
    group_ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    if len(sizes) > 1:
        loss_mask[group_ids == len(sizes) - 1] = 0          # a dead group
    live = range(len(sizes) - 1) if len(sizes) > 1 else range(1)
    big = max(live, key=lambda g: sizes[g])
    if sizes[big] > 1:
        loss_mask[int((group_ids == big).nonzero()[0])] = 0  # a dead row in a live group
    rewards = torch.randn(B, generator=gen, dtype=torch.float64)
    advantages = normalize_advantages(rewards, group_sizes=sizes).to(torch.float32)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "advantages": advantages,
            "group_ids": group_ids, "group_sizes": sizes}


# ----------------------------------------------------------------------------------------------
# comparison and report
# ----------------------------------------------------------------------------------------------

def relative_grad_diff(got: dict, ref: dict) -> tuple[float, str]:
    """``max over tensors of max|got - ref| / max|ref|``, and the tensor where it is largest.

    Relative to each tensor's own scale (so a small-gradient tensor such as a norm bias is not hidden
    by the embedding); a tensor whose reference is all zero is compared with the largest reference
    entry of the model instead.
    """
    if set(got) != set(ref):
        raise KeyError(f"gradient keys differ: only in layout {sorted(set(got) - set(ref))}, "
                       f"only in reference {sorted(set(ref) - set(got))}")
    overall = max(float(r.abs().max()) for r in ref.values()) if ref else 0.0
    worst, worst_key = 0.0, ""
    for key in sorted(ref):
        r, g = ref[key].double(), got[key].double()
        if g.shape != r.shape:
            raise ValueError(f"{key}: layout gradient {tuple(g.shape)} vs reference {tuple(r.shape)}")
        scale = float(r.abs().max()) or overall or 1.0
        rel = float((g - r).abs().max()) / scale
        if not math.isfinite(rel):
            rel = math.inf
        if rel > worst or not worst_key:
            worst, worst_key = rel, key
    return worst, worst_key


def format_table(results: Sequence[dict], layouts: Sequence[str], modes: Sequence[str], tolerance: float,
                 inject_bug: Optional[str] = None) -> str:
    """The mode x layout table: each cell is the relative difference and PASS/FAIL (``-`` if not run)."""
    cell = {(r["mode"], r["layout"]): r for r in results}
    width = max(12, *(len(n) for n in layouts))
    head = f"{'mode':<24}" + "".join(f" | {n:<{width}}" for n in layouts)
    lines = [f"max relative gradient difference vs the single-process reference (tolerance {tolerance:.0e})"]
    if inject_bug:
        lines.append(f"SELF-TEST: bug {inject_bug!r} injected on purpose; FAIL rows are expected")
    lines += [head, "-" * len(head)]
    for mode in modes:
        row = f"{mode:<24}"
        for name in layouts:
            r = cell.get((mode, name))
            text = "-" if r is None else f"{r['rel_diff']:.1e} {r['status']}"
            row += f" | {text:<{width}}"
        lines.append(row)
    fails = [r for r in results if r["status"] != PASS]
    per_layout = [r for r in results if r.get("per_layout_reference")]
    if per_layout:
        lines.append("token_mean_legacy and microbatch_mean terms are per-micro-batch means by definition: "
                     "their reference follows each layout's micro-batch split.")
    lines.append(f"{len(results) - len(fails)} PASS, {len(fails)} FAIL")
    for r in fails:
        lines.append(f"  FAIL {r['mode']} @ {r['layout']}: {r['rel_diff']:.3e} at {r['worst_param']}")
    return "\n".join(lines)


def exit_status(results: Sequence[dict]) -> int:
    """0 when every result passed, 1 when any failed, 2 when there is no result at all."""
    if not results:
        return 2
    return 0 if all(r["status"] == PASS for r in results) else 1


# ----------------------------------------------------------------------------------------------
# entry point: launcher or worker
# ----------------------------------------------------------------------------------------------

def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_invariance(args: argparse.Namespace) -> int:
    """Run the audit; returns the exit status. Re-launches under torchrun unless already under it."""
    try:
        plan = _plan(args)
    except ValueError as err:
        print(f"check-invariance: error: {err}", file=sys.stderr)
        return 2
    if _under_torchrun():
        return _worker(args, plan)
    return _launch(args, plan)


def _worker_argv(args: argparse.Namespace, layouts: Sequence[Layout], json_path: str) -> list[str]:
    """The flags of this run, spelled out, for the torchrun workers (one process count per launch)."""
    argv = ["check-invariance", "--layouts", " ".join(layout_name(lay) for lay in layouts),
            "--modes", *args.modes, "--json", json_path, "--seed", str(args.seed),
            "--kl-estimator", args.kl_estimator, "--kl-aggregation", args.kl_aggregation,
            "--entropy-aggregation", args.entropy_aggregation]
    for flag in ("tolerance", "num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length",
                 "batch_size", "kl_coef", "entropy_coef", "max_response_length", "inject_bug", "num_experts",
                 "moe_router_topk", "moe_token_dispatcher_type"):
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), str(value)]
    if args.bf16:
        argv.append("--bf16")
    if args.calculate_per_token_loss:
        argv.append("--calculate-per-token-loss")
    return argv


def _launch(args: argparse.Namespace, plan: _Plan) -> int:
    """One torchrun per distinct process count; merge their JSON results; print the table."""
    by_world: dict[int, list[Layout]] = {}
    for lay in plan.layouts:
        by_world.setdefault(lay.world_size, []).append(lay)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    results, skipped, started = [], [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rl_agg_audit_") as tmp:
        for world, layouts in sorted(by_world.items()):
            names = [layout_name(lay) for lay in layouts]
            if gpus and world > gpus:
                skipped.append(f"{' '.join(names)} (needs {world} GPUs, {gpus} visible)")
                continue
            json_path = os.path.join(tmp, f"world{world}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                   "-m", "megatron_rl_agg.cli", *_worker_argv(args, layouts, json_path)]
            env = dict(os.environ)
            if not gpus:
                env.setdefault("OMP_NUM_THREADS", "1")
            print(f"[check-invariance] torchrun --nproc-per-node {world}: {' '.join(names)}", flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if not os.path.exists(json_path):
                print(f"check-invariance: error: the {world}-process run exited with {proc.returncode} "
                      f"without results\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}", file=sys.stderr)
                return 2
            with open(json_path, encoding="utf-8") as fh:
                results += json.load(fh)["results"]
    return _report(args, plan, results, skipped, time.perf_counter() - started)


def _report(args, plan: _Plan, results: list, skipped: list, seconds: float) -> int:
    names = [layout_name(lay) for lay in plan.layouts]
    print(format_table(results, [n for n in names if any(r["layout"] == n for r in results)], plan.modes,
                       plan.tolerance, args.inject_bug))
    for item in skipped:
        print(f"skipped: {item}")
    print(f"checked {len(results)} mode x layout pairs in {seconds:.1f} s")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump({"tolerance": plan.tolerance, "inject_bug": args.inject_bug, "modes": plan.modes,
                       "layouts": names, "skipped": skipped, "results": results}, fh, indent=1)
    return exit_status(results)


# ----------------------------------------------------------------------------------------------
# the worker (every rank of one torchrun)
# ----------------------------------------------------------------------------------------------

def _worker(args: argparse.Namespace, plan: _Plan) -> int:
    import torch.distributed as torch_dist

    from megatron_rl_agg.mcore import compat, cpu_mode

    started = time.perf_counter()
    rank, world = compat.initialize_distributed()
    layouts = [lay for lay in plan.layouts if lay.world_size == world]
    skipped = [f"{layout_name(lay)} (needs {lay.world_size} processes, this run has {world})"
               for lay in plan.layouts if lay.world_size != world]
    if not layouts:
        if rank == 0:
            print(f"check-invariance: error: no layout needs exactly {world} processes; "
                  f"layouts: {' '.join(layout_name(lay) for lay in plan.layouts)}", file=sys.stderr)
        return 2
    spec = _model_spec(args)
    batch = make_batch(batch_size=args.batch_size, seq_length=args.seq_length, vocab_size=args.vocab_size,
                       seed=args.seed)
    device = cpu_mode.device()
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    reference = _reference_grads(args, plan, spec, batch, layouts)
    results = []
    for lay in layouts:
        t0 = time.perf_counter()
        grads = _layout_grads(args, plan, spec, batch, lay)
        for mode in plan.modes:
            ref_key = _reference_key(plan, mode, args.batch_size, lay)
            rel, where = relative_grad_diff(grads[mode], reference[ref_key])
            results.append({"mode": mode, "layout": layout_name(lay), "rel_diff": rel, "worst_param": where,
                            "status": PASS if rel <= plan.tolerance else FAIL,
                            "per_layout_reference": ref_key[1] is not None,
                            "seconds": round(time.perf_counter() - t0, 3)})
        if rank == 0:
            print(f"[check-invariance] {layout_name(lay)}: {time.perf_counter() - t0:.1f} s", flush=True)
    compat.destroy_model_parallel()
    if rank == 0:
        status = _report(args, plan, results, skipped, time.perf_counter() - started)
    else:
        status = exit_status(results)
    torch_dist.barrier()
    return status


def _model_spec(args: argparse.Namespace):
    """The audited GPT: dense, or MoE with ``--num-experts`` (no linear biases, aux loss off)."""
    from megatron_rl_agg.mcore.model import GPTSpec

    moe = args.num_experts is not None
    return GPTSpec(num_layers=args.num_layers, hidden_size=args.hidden_size,
                   num_attention_heads=args.num_attention_heads, vocab_size=args.vocab_size,
                   max_seq_length=args.seq_length, bf16=args.bf16, add_bias_linear=not moe,
                   num_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
                   moe_token_dispatcher_type=args.moe_token_dispatcher_type)


def _per_microbatch(plan: _Plan, mode: str) -> bool:
    """Whether any term of ``mode``'s loss is a per-micro-batch mean (a layout-dependent objective)."""
    return mode == "token_mean_legacy" or MICROBATCH_MEAN in (_term_mode(plan.kl_aggregation, mode),
                                                              _term_mode(plan.entropy_aggregation, mode))


def _reference_key(plan: _Plan, mode: str, batch_size: int, lay: Layout) -> tuple[str, Optional[int]]:
    """``(mode, micro-batch rows)``; the rows only matter for per-micro-batch terms."""
    return mode, (batch_size // (lay.data_parallel_size * lay.num_microbatches) if _per_microbatch(plan, mode)
                  else None)


def _reference_grads(args, plan: _Plan, spec, batch: dict, layouts: Sequence[Layout]) -> dict:
    """Single-process reference gradients ``{(mode, rows or None): {key: grad}}``.

    Built on every rank at tp = pp = 1 WITHOUT DDP: plain autograd through the full model on the whole
    mini-batch, the objective written from the definitions (``aggregate`` on full-vocabulary
    log-probs/entropy). Also fills ``batch["old_logprobs"]`` / ``batch["ref_logprobs"]``: the current
    log-probs plus fixed noise (so PPO ratios straddle the clip range), broadcast from rank 0.
    """
    import torch.distributed as torch_dist

    from megatron_rl_agg.mcore import compat
    from megatron_rl_agg.core.losses import (entropy_from_logits, kl_estimate, logprobs_from_logits,
                                        ppo_clipped_surrogate)
    from megatron_rl_agg.mcore.model import build_model, gather_full_grads, init_weights

    compat.initialize_model_parallel(1, 1, seed=args.seed)
    chunks = build_model(spec, wrap_ddp=False)
    init_weights(chunks, seed=args.seed)
    model = chunks[0]
    tokens = batch["tokens"]
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    mask = batch["loss_mask"]

    with torch.no_grad():
        logp0 = logprobs_from_logits(model(tokens, positions, None), batch["labels"])
        gen = torch.Generator().manual_seed(args.seed + 1)
        noise = torch.randn((2,) + tuple(logp0.shape), generator=gen).to(logp0.device)
        old, ref = logp0 + 0.1 * noise[0], logp0 + 0.3 * noise[1]
        torch_dist.broadcast(old, src=0)
        torch_dist.broadcast(ref, src=0)
    batch["old_logprobs"], batch["ref_logprobs"] = old, ref

    keys = {_reference_key(plan, mode, args.batch_size, lay) for mode in plan.modes for lay in layouts}
    out = {}
    for mode, rows in sorted(keys, key=lambda k: (k[0], k[1] or 0)):
        cfg = _loss_config(plan, args, mode)

        def agg(values, term_mode):
            if term_mode in (MICROBATCH_MEAN, "token_mean_legacy"):
                return aggregate(values, mask, "token_mean_legacy", micro_batch_size=rows)
            return aggregate(values, mask, term_mode, group_sizes=batch["group_sizes"],
                             max_response_length=cfg.max_response_length)

        model.zero_grad(set_to_none=True)
        logits = model(tokens, positions, None).float()
        logp = logprobs_from_logits(logits, batch["labels"])
        pg, _, _ = ppo_clipped_surrogate(logp, old, batch["advantages"], clip_eps_low=cfg.clip_eps_low,
                                         clip_eps_high=cfg.clip_eps_high, dual_clip_c=cfg.dual_clip_c)
        objective = agg(pg, mode)
        if cfg.kl_coef > 0:
            kl = kl_estimate(logp, ref, cfg.kl_estimator)
            objective = objective + cfg.kl_coef * agg(kl, cfg.kl_aggregation)
        if cfg.entropy_coef > 0:
            entropy = entropy_from_logits(logits)
            objective = objective - cfg.entropy_coef * agg(entropy, cfg.entropy_aggregation)
        objective.backward()
        out[(mode, rows)] = gather_full_grads(chunks)
    del chunks, model
    compat.destroy_model_parallel()
    return out


def _layout_grads(args, plan: _Plan, spec, batch: dict, lay: Layout) -> dict:
    """``{mode: {key: grad}}`` after one forward-backward of the plugin's loss in layout ``lay``."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rl_agg.mcore import compat
    from megatron_rl_agg.mcore.batch import prepare_microbatches
    from megatron_rl_agg.mcore.loss import forward_step
    from megatron_rl_agg.mcore.model import build_model, gather_full_grads, init_weights

    compat.initialize_model_parallel(lay.tp, lay.pp, lay.vpp, cp=lay.cp, seed=args.seed, ep=lay.ep)
    flag = bool(args.calculate_per_token_loss)
    chunks = build_model(spec, calculate_per_token_loss=flag)
    init_weights(chunks, seed=args.seed)
    dp_group = parallel_state.get_data_parallel_group()
    cp_group = parallel_state.get_context_parallel_group()
    dp_rank = parallel_state.get_data_parallel_rank()
    rows = args.batch_size // lay.data_parallel_size
    mbs = rows // lay.num_microbatches
    keys = ("tokens", "labels", "loss_mask", "advantages", "old_logprobs", "ref_logprobs", "group_ids")
    local = {k: batch[k][dp_rank * rows:(dp_rank + 1) * rows] for k in keys}
    forward_backward = get_forward_backward_func()
    out = {}
    for mode in plan.modes:
        cfg = _loss_config(plan, args, mode)
        for chunk in chunks:
            chunk.zero_grad_buffer()
        micro_batches = prepare_microbatches(local, cfg, mbs, dp_group=dp_group, cp_group=cp_group,
                                             calculate_per_token_loss=flag)
        _inject(args.inject_bug, micro_batches, local, cfg, mbs)
        iters = [iter(micro_batches) for _ in chunks]
        forward_backward(forward_step_func=forward_step, data_iterator=iters if len(chunks) > 1 else iters[0],
                         model=chunks, num_microbatches=len(micro_batches), seq_length=args.seq_length,
                         micro_batch_size=mbs, forward_only=False)
        out[mode] = gather_full_grads(chunks)
    del chunks
    return out


def _inject(bug: Optional[str], micro_batches: list, local: dict, cfg: LossConfig, mbs: int) -> None:
    """Apply the ``--inject-bug`` self-test to the prepared micro-batches (in place)."""
    if bug is None:
        return
    if bug == "kl_times_microbatches":
        wrong = dataclasses.replace(cfg, kl_coef=cfg.kl_coef * len(micro_batches))
        for mb in micro_batches:
            mb["loss_config"] = wrong
        return
    # local_token_count: global weights from this rank's counts only (process_group=None).
    # cp_token_count: counts summed over dp x cp, where the CP ranks of a DP rank hold the same rows.
    from megatron.core import parallel_state

    from megatron_rl_agg.core.aggregation import token_weights
    from megatron_rl_agg.core.context_parallel import split_for_cp_rank

    group = (parallel_state.get_data_parallel_group(with_context_parallel=True)
             if bug == "cp_token_count" else None)
    cp_size = parallel_state.get_context_parallel_world_size()
    cp_rank = parallel_state.get_context_parallel_rank()

    for key, mode in (("pg_weights", cfg.loss_aggregation), ("kl_weights", cfg.kl_aggregation),
                      ("entropy_weights", cfg.entropy_aggregation)):
        if mode in (MICROBATCH_MEAN, "token_mean_legacy") or (key == "kl_weights" and cfg.kl_coef == 0) \
                or not get_aggregation(mode).exact_global:
            continue
        w = token_weights(local["loss_mask"], mode, group_ids=local["group_ids"],
                          max_response_length=cfg.max_response_length, process_group=group,
                          dtype=torch.float64)
        for k, mb in enumerate(micro_batches):
            mb[key] = split_for_cp_rank(w[k * mbs:(k + 1) * mbs], cp_size, cp_rank, dim=1)
