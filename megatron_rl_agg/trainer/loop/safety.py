"""Run-time safety of the trainer: the non-finite guard, clean stop on signals, collective timeouts.

* :func:`check_update`: after Megatron's forward-backward and before the optimizer update, one flag per
  loss term and one for the gradients (finite or not), OR-ed over every rank in one all-reduce, so every
  rank takes the same decision: raise :class:`NonFiniteError` naming the step, the term and the likely
  input (``--on-nonfinite error``, the default), or drop the update (``skip``). A finite loss does not
  hide a NaN gradient: the global gradient norm is checked itself (NaN logits at masked positions have
  zero loss weight but still poison the backward pass; gradients of 1e20 overflow the norm).
* :class:`StopSignal`: SIGINT / SIGTERM set a flag; the loop checks it after every step (again one
  all-reduce, so every rank stops after the same step), saves when asked and returns normally. A second
  signal, more than :data:`REPEAT_S` seconds after the first, abandons the step at once
  (``KeyboardInterrupt``). torchrun forwards the signal it receives to its workers, so a Ctrl-C reaches
  a worker twice within milliseconds: that pair counts as one.
* :func:`describe_timeout`: a collective that exceeded ``--distributed-timeout-minutes`` becomes a
  :class:`DistributedTimeoutError` naming the ranks that did not answer through the rendezvous store.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Optional

import torch

from megatron_rl_agg.parallel import dist

__all__ = ["NonFiniteError", "DistributedTimeoutError", "check_update", "StopSignal", "describe_timeout",
           "is_timeout", "truncate_metrics", "REPEAT_S"]

REPEAT_S = 1.0

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


class DistributedTimeoutError(RuntimeError):
    """A collective did not complete within ``--distributed-timeout-minutes``."""


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


class StopSignal:
    """SIGINT / SIGTERM -> a flag the training loop polls after each step (see the module docstring)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._at = 0.0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignal":
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:      # not the main thread: signals stay with whoever owns them
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.received is not None:
            if now - self._at > REPEAT_S:
                raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: step abandoned")
            return
        self.received, self._at = signum, now
        print(f"[megatron_rl_agg] {signal.Signals(signum).name} received: finishing the current step, then "
              "stopping (send it again to abandon the step)", file=sys.stderr, flush=True)

    def requested(self, device=None) -> bool:
        """True on every rank when any rank received a signal (one all-reduce over the world)."""
        flag = torch.tensor([float(self.received is not None)], device=device)
        return bool(dist.all_reduce_max(flag, dist.world_group()).item())


def is_timeout(err: BaseException) -> bool:
    """A collective's timeout (gloo: "Timed out waiting ..."; NCCL's watchdog: "... timeout ...")."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


def describe_timeout(err: BaseException, timeout_minutes: float) -> DistributedTimeoutError:
    """The timeout ``err`` with the ranks that did not answer through the rendezvous store named."""
    missing = dist.unresponsive_ranks("megatron_rl_agg/timeout", wait_s=min(10.0, 60 * timeout_minutes))
    who = (f"rank(s) {missing} did not answer (stopped, dead or stuck)" if missing
           else "every rank still answers through the rendezvous store (a collective mismatch?)")
    return DistributedTimeoutError(
        f"rank {dist.rank(dist.world_group())}: a collective did not complete within "
        f"--distributed-timeout-minutes {timeout_minutes:g}: {who}. ({str(err).splitlines()[0][:300]})")


def truncate_metrics(path: Optional[str], last_step: int) -> int:
    """Drop the lines of ``path`` after step ``last_step`` (they belong to steps a resume runs again), so
    every step appears once; the file is rewritten atomically. Returns the number of lines dropped."""
    if not path or not os.path.isfile(path):
        return 0
    from megatron_rl_agg.trainer.loop.checkpoint import atomic_write_text

    with open(path, encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    keep = [line for line in lines if json.loads(line).get("step", math.inf) <= last_step]
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(keep))
    return len(lines) - len(keep)
