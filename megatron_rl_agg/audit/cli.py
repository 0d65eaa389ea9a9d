"""The ``check-invariance`` command: its flags (:func:`add_audit_args`) and its entry point
(:func:`check_invariance`: validate, then launch under torchrun or run as a worker)."""

from __future__ import annotations

import argparse
import os
import sys

from megatron_rl_agg.audit.plan import AUDIT_BUGS, DEFAULT_LAYOUTS, SAME, _plan
from megatron_rl_agg.audit.runner import _launch, _worker
from megatron_rl_agg.core.aggregation import LOSS_AGGREGATIONS
from megatron_rl_agg.core.config import KL_ESTIMATORS
from megatron_rl_agg.core.corrections import IS_LEVELS, IS_MODES
from megatron_rl_agg.core.policy_losses import POLICY_LOSSES
from megatron_rl_agg.mcore.spec import MOE_TOKEN_DISPATCHERS

__all__ = ["add_audit_args", "check_invariance"]


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
    g.add_argument("--policy-loss", nargs="+", default=["ppo_clip"], metavar="LOSS",
                   help="policy losses to audit, separated by ',', ';' or spaces (aliases accepted), or 'all': "
                        + ", ".join(POLICY_LOSSES) + " (default: ppo_clip); each runs with its paper defaults "
                        "at every layout and mode; with --modes all a sequence-level loss skips the modes it "
                        "refuses (listed), with named --modes such a combination is an error")
    g.add_argument("--tolerance", type=float, default=None,
                   help="largest relative gradient difference that passes "
                        "(default 1e-4, or 5e-2 with --bf16)")
    g.add_argument("--inject-bug", choices=AUDIT_BUGS, default=None,
                   help="SELF-TEST OF THE AUDIT ONLY: inject a wrong correction factor and expect FAIL rows "
                        "(kl_times_microbatches: layouts with m > 1; local_token_count: layouts with dp > 1; "
                        "cp_token_count: layouts with cp > 1; cp_shard_sequence_ratio: the sequence-level losses at "
                        "layouts with cp > 1; is_microbatch_normalization: the IS self-normalization over each "
                        "micro-batch instead of the mini-batch, layouts with dp * m > 1 or cp > 1, needs "
                        "--is-level and --is-self-normalize)")
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
    m.add_argument("--moe-routing-replay", choices=("off", "r2"), default="off",
                   help="MoE: r2 records the routes of the reference's forward (before the gradient pass) and "
                        "replays them in the reference and at every layout (docs/routing_replay.md)")
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
    b.add_argument("--is-level", choices=IS_LEVELS, default="off",
                   help="off-policy correction audited (docs/off_policy.md): behaviour log-probs differing from "
                        "the proximal ones, importance weights pi_prox / pi_behave at this level (default off)")
    b.add_argument("--is-mode", choices=IS_MODES, default=None,
                   help="treatment of the weights (needs --is-level): truncate (above 1.2), clip (to [0.8, "
                        "1.2]) or mask (0 outside [0.8, 1.2]); default truncate")
    b.add_argument("--is-self-normalize", action="store_true",
                   help="self-normalize the importance weights over the mini-batch (needs --is-level)")
    b.add_argument("--max-response-length", type=int, default=None,
                   help="L of seq_mean_token_sum_norm (default: --seq-length)")
    return parser


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
