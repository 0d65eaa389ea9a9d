"""The non-finite guard of one optimizer update (``--on-nonfinite``).

:func:`check_update`: after Megatron's forward-backward and before the optimizer update, one flag per loss
term and one for the gradients (finite or not), OR-ed over every rank in one all-reduce, so every rank
takes the same decision: raise :class:`NonFiniteError` naming the step, the term and the likely input
(``--on-nonfinite error``, the default), or drop the update (``skip``). A finite loss does not hide a NaN
gradient: the global gradient norm is checked itself (NaN logits at masked positions have zero loss
weight but still poison the backward pass; gradients of 1e20 overflow the norm).
"""

from __future__ import annotations

import math
import sys

import torch

from megatron_rl_agg.parallel import dist

__all__ = ["NonFiniteError", "check_update"]

# Report names of the loss terms checked for finiteness (summed over the micro-batches of the update).
_TERMS = (("policy_loss/sum", "policy-gradient term"), ("kl_loss/sum", "KL term"),
          ("entropy_loss/sum", "entropy term"))

_LIKELY = {
    "policy-gradient term": "the importance ratio exp(logp - old_logp) overflowed or an advantage is not "
                            "finite: check the behaviour log-probs ('logprobs') and rewards of these rows",
    "KL term": "the reference log-probs are far from the policy's (exp of their difference overflows): "
               "check --ref-load, lower --lr or --kl-coef",
    "entropy term": "the logits are not finite: lower --lr (or --clip-grad)",
    "gradient": "the loss is finite but its gradient is not: NaN / inf logits at positions outside the "
                "loss mask, or a ratio that overflows where the clip makes the loss constant; check the "
                "rows, lower --lr",
}


class NonFiniteError(RuntimeError):
    """A non-finite loss term or gradient before an optimizer update (``--on-nonfinite error``)."""


def _grad_norm(optimizer) -> float:
    """The global gradient norm the optimizer's step is about to clip with, computed by Megatron's own
    ``prepare_grads`` + ``get_grad_norm`` (identical on every rank: reduced over the model-parallel
    group, and over DP with the distributed optimizer). NaN / inf in any gradient, or a sum of squares
    that overflows float32, make it non-finite. ``prepare_grads`` only copies / points the model grads at
    the main grads, so the step repeating it is harmless. With fp16 loss scaling an overflow is the
    scaler's business (the step skips it itself): 0 is returned then."""
    if optimizer.prepare_grads():
        return 0.0
    norm = optimizer.get_grad_norm()
    return float(norm) if norm is not None else 0.0


def _rows_hint(source, step: int, index: int) -> str:
    rows = getattr(source, "batch_rows", None)
    samples = getattr(source, "samples", None)
    if rows is None or not samples:
        return ""
    a, b = rows(step, index)
    return f" (rollout rows {samples[a].source} .. {samples[b - 1].source})"


def check_update(optimizer, reports: list, *, step: int, index: int, num_updates: int,
                 policy: str, source=None, device=None) -> bool:
    """True when update ``index`` of ``step`` may be applied; False when it must be skipped.

    Every rank calls it with its own reports (the last pipeline stage has them, the others an empty
    list) and gets the same answer: the flags are OR-ed over the world in one all-reduce (max).

    Raises:
        NonFiniteError: a non-finite term or gradient with ``policy == "error"``, on every rank.
    """
    device = device or torch.device("cpu")
    flags = []
    for key, _ in _TERMS:
        values = [r[key] for r in reports if key in r]
        total = torch.stack(values).sum() if values else torch.zeros((), dtype=torch.float64, device=device)
        flags.append(~torch.isfinite(total.to(device)))
    flags.append(torch.tensor(not math.isfinite(_grad_norm(optimizer)), device=device))
    world = dist.world_group()
    bad = dist.all_reduce_max(torch.stack(flags).to(torch.float32), world).tolist()
    if not any(bad):
        return True
    names = [name for (_, name), b in zip(_TERMS, bad) if b] or ["gradient"]
    what = ", ".join(names) + ("" if names == ["gradient"] else " (and so the gradient)")
    message = (f"step {step}, update {index + 1} of {num_updates}: non-finite {what} before the optimizer "
               f"update{_rows_hint(source, step, index)}; likely cause: {_LIKELY[names[0]]}. Nothing was "
               "applied to the weights")
    if policy == "error":
        raise NonFiniteError(message + " (--on-nonfinite skip drops such updates and counts them)")
    if dist.rank(world) == 0:
        print(f"[megatron_rl_agg] skipped: {message}", file=sys.stderr, flush=True)
    return False
