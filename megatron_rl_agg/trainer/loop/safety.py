"""Run-time safety of the training loop: clean stop on signals, collective timeouts, the metrics file on
resume. (The non-finite guard of each update: :mod:`megatron_rl_agg.trainer.step.nonfinite`.)

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

__all__ = ["DistributedTimeoutError", "RewardFailureError", "StopSignal", "describe_timeout", "is_timeout", "truncate_metrics",
           "REPEAT_S"]

REPEAT_S = 1.0

class DistributedTimeoutError(RuntimeError):
    """A collective did not complete within ``--distributed-timeout-minutes``."""


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


class RewardFailureError(ValueError):
    """More than ``--max-reward-failure-frac`` of a mini-batch's samples has no reward (timed out, raised or
    non-finite): raised on every rank with the same message (the reward, the fraction, the first failing
    prompt), before the mini-batch enters any update."""


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
