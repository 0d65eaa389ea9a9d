"""Comparison and report of the audit: the relative gradient difference, the mode x layout table, the exit
status and the printed / JSON report of a run."""

from __future__ import annotations

import json
import math
from typing import Optional, Sequence

from megatron_rl_agg.audit.plan import IS_BOUNDS, _Plan

__all__ = ["relative_grad_diff", "format_table", "exit_status"]

PASS, FAIL = "PASS", "FAIL"


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


def format_table(results: Sequence[dict], layouts: Sequence[str], pairs: Sequence[tuple[str, str]],
                 tolerance: float, inject_bug: Optional[str] = None) -> str:
    """The (policy loss, mode) x layout table: each cell is the relative difference and PASS/FAIL (``-`` if
    not run). ``results`` carry ``policy_loss``, ``mode``, ``layout``, ``rel_diff``, ``status``,
    ``worst_param``."""
    cell = {(r["policy_loss"], r["mode"], r["layout"]): r for r in results}
    width = max(12, *(len(n) for n in layouts))
    lw = max(11, *(len(loss) for loss, _ in pairs)) if pairs else 11
    head = f"{'policy loss':<{lw}} {'mode':<24}" + "".join(f" | {n:<{width}}" for n in layouts)
    lines = [f"max relative gradient difference vs the single-process reference (tolerance {tolerance:.0e})"]
    if inject_bug:
        lines.append(f"SELF-TEST: bug {inject_bug!r} injected on purpose; FAIL rows are expected")
    lines += [head, "-" * len(head)]
    for loss, mode in pairs:
        row = f"{loss:<{lw}} {mode:<24}"
        for name in layouts:
            r = cell.get((loss, mode, name))
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
        lines.append(f"  FAIL {r['policy_loss']} {r['mode']} @ {r['layout']}: {r['rel_diff']:.3e} at {r['worst_param']}")
    return "\n".join(lines)


def exit_status(results: Sequence[dict]) -> int:
    """0 when every result passed, 1 when any failed, 2 when there is no result at all."""
    if not results:
        return 2
    return 0 if all(r["status"] == PASS for r in results) else 1


def _report(args, plan: _Plan, results: list, skipped: list, seconds: float) -> int:
    names = [str(lay) for lay in plan.layouts]
    print(format_table(results, [n for n in names if any(r["layout"] == n for r in results)], plan.pairs,
                       plan.tolerance, args.inject_bug))
    if plan.is_level != "off":
        print(f"off-policy correction: --is-level {plan.is_level} --is-mode {plan.is_mode} (bounds "
              f"[{IS_BOUNDS[0]:g}, {IS_BOUNDS[1]:g}]), self-normalized over the mini-batch: "
              f"{'yes' if plan.is_self_normalize else 'no'}")
    for item in plan.refused:
        print(f"not audited (refused by the loss configuration): {item}")
    for item in skipped:
        print(f"skipped: {item}")
    print(f"checked {len(results)} (policy loss, mode) x layout cells in {seconds:.1f} s")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump({"tolerance": plan.tolerance, "inject_bug": args.inject_bug, "modes": plan.modes,
                       "policy_losses": plan.policy_losses, "refused": plan.refused,
                       "is_level": plan.is_level, "is_mode": plan.is_mode,
                       "is_self_normalize": plan.is_self_normalize, "layouts": names, "skipped": skipped, "results": results}, fh, indent=1)
    return exit_status(results)
