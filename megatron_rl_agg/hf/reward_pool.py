"""Reward functions run in worker processes with a per-sample time limit (``--reward-timeout``).

A reward is user code or a symbolic parser (``math_verify`` on ``\\boxed{9^{9^{9^{9}}}}`` never returns),
so it runs in a small pool of worker processes, never in the trainer's own: each worker holds one sample at
a time; a sample that outlives its limit has its worker killed (SIGKILL, then reaped) and a fresh worker
replaces it on demand. The timer of a sample starts when a ready worker receives it (a worker's start-up,
the import of the reward, is not charged to any sample).

Workers are started from a ``forkserver`` (a clean process, not a fork of the trainer's threads) and
resolve the reward by its ``--reward`` name (:func:`megatron_rl_agg.hf.rewards.get_reward`), so any
``module:function`` importable by the trainer works. The pool is bounded (``workers`` processes at most),
started on first use, and shut down by :meth:`RewardPool.close` (the trainer calls it on every exit path;
a finalizer and the workers' end-of-input exit cover the rest).

Every sample gets a :class:`RewardResult`: its value, or the reason it has none (a timeout, an exception
inside the reward, a non-finite value, a worker that died). A sample without a value is invalid: the
trainer leaves it out of the group statistics and the loss (see :mod:`megatron_rl_agg.hf.rewards`).
"""

from __future__ import annotations

import math
import multiprocessing
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Optional, Sequence

from megatron_rl_agg.core.validate import positive_int

__all__ = ["RewardResult", "RewardPool", "RewardWorkerError"]

_START_TIMEOUT_S = 300.0     # importing a reward (sympy for math_verify) can take seconds on a busy host


class RewardWorkerError(RuntimeError):
    """A reward worker that cannot start (the reward does not import in it, or it died on start-up)."""


@dataclass(frozen=True)
class RewardResult:
    """The reward of one sample: ``value`` (finite) when ``error`` is None, else why it has none."""

    value: Optional[float]
    error: Optional[str] = None
    """``"timed out after T s"``, ``"raised Type: message"``, ``"non-finite reward nan"`` or
    ``"worker died (exit code C)"``."""

    @property
    def ok(self) -> bool:
        return self.error is None


def _worker_main(conn, reward: str) -> None:
    """Worker loop: resolve the reward, say ready, then score ``(index, prompt, response, answer)`` tasks
    until ``None`` or the end of input (the trainer is gone)."""
    from megatron_rl_agg.hf.rewards import get_reward

    try:
        fn = get_reward(reward)
    except Exception as err:  # noqa: BLE001 - reported to the trainer, which raises
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        index, prompt, response, answer = task
        try:
            conn.send((index, "ok", float(fn(prompt, response, answer))))
        except Exception as err:  # noqa: BLE001 - one bad sample is the sample's failure, not the worker's
            conn.send((index, "raised", f"{type(err).__name__}: {err}"[:500]))


class _Worker:
    def __init__(self, ctx, reward: str):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, reward), daemon=True,
                                name="megatron_rl_agg-reward")
        self.proc.start()
        child.close()
        self.ready = False
        self.started = time.monotonic()
        self.task: Optional[int] = None         # index of the sample it holds
        self.deadline = 0.0

    def kill(self) -> None:
        try:
            self.conn.close()
        finally:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=10)


def _shutdown(workers: list) -> None:
    for w in workers:
        try:
            if w.proc.is_alive():
                w.conn.send(None)
        except (OSError, ValueError):
            pass
    for w in workers:
        w.proc.join(timeout=1)
        w.kill()
    workers.clear()


class RewardPool:
    """Scores samples with the reward ``reward`` (a ``--reward`` name) in at most ``workers`` processes,
    each sample within ``timeout`` seconds.

    Usage: ``pool.score([(prompt, response, answer), ...]) -> [RewardResult]`` (in input order), then
    ``pool.close()`` (or ``with RewardPool(...) as pool``).
    """

    def __init__(self, reward: str, *, timeout: float = 10.0, workers: int = 1, start_method: str = "forkserver"):
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"reward timeout must be a positive number of seconds, got {timeout!r}")
        positive_int(workers, "reward workers", must="an int >= 1")
        self.reward, self.timeout, self.num_workers = reward, float(timeout), workers
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # The server imports these once; each worker forks from it with them loaded (no torch import
            # per worker). Only takes effect before the process's forkserver starts.
            self._ctx.set_forkserver_preload(["megatron_rl_agg.hf.rewards"]
                                             + (["math_verify"] if reward == "math_verify" else []))
        self._workers: list[_Worker] = []
        self.num_killed = 0
        """Workers killed so far (one per timed-out sample)."""
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (idempotent); a later :meth:`score` starts new ones."""
        _shutdown(self._workers)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def _start(self) -> _Worker:
        worker = _Worker(self._ctx, self.reward)
        self._workers.append(worker)
        return worker

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.remove(worker)

    def score(self, items: Sequence[tuple[str, str, str]]) -> list[RewardResult]:
        """``[RewardResult]`` of ``items`` (``(prompt, response, answer)`` each), in order.

        Raises:
            RewardWorkerError: a worker could not start (the reward does not import in it).
        """
        results: list[Optional[RewardResult]] = [None] * len(items)
        pending = list(range(len(items)))[::-1]           # popped from the end: input order
        while True:
            busy = sum(w.task is not None for w in self._workers)
            if not pending and not busy:
                return results
            while len(self._workers) < min(self.num_workers, len(pending) + busy):
                self._start()
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    index = pending.pop()
                    w.task, w.deadline = index, time.monotonic() + self.timeout
                    w.conn.send((index, *items[index]))
            now = time.monotonic()
            deadlines = [w.deadline if w.task is not None else w.started + _START_TIMEOUT_S
                         for w in self._workers if w.task is not None or not w.ready]
            limit = max(0.0, min(deadlines) - now) if deadlines else None
            by_conn = {w.conn: w for w in self._workers}
            for conn in wait(list(by_conn), timeout=limit):
                self._receive(by_conn[conn], results)
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now >= w.deadline:
                    results[w.task] = RewardResult(None, f"timed out after {self.timeout:g} s")
                    self.num_killed += 1
                    self._retire(w)
                elif not w.ready and now >= w.started + _START_TIMEOUT_S:
                    self._retire(w)
                    raise RewardWorkerError(f"a reward worker of --reward {self.reward!r} did not start within "
                                            f"{_START_TIMEOUT_S:g} s")

    def _receive(self, worker: _Worker, results: list) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            worker.proc.join(timeout=10)
            code = worker.proc.exitcode
            self._retire(worker)
            if worker.task is None and worker.ready:
                return                                  # an idle worker gone: replaced on demand
            if worker.task is None:
                raise RewardWorkerError(f"the reward worker of --reward {self.reward!r} died on start-up "
                                        f"(exit code {code})") from None
            results[worker.task] = RewardResult(None, f"worker died (exit code {code})")
            return
        if message[0] == "failed":
            self._retire(worker)
            raise RewardWorkerError(f"--reward {self.reward!r} does not load in a reward worker: {message[1]}")
        if message[0] == "ready":
            worker.ready = True
            return
        index, kind, payload = message
        worker.task = None
        if kind == "raised":
            results[index] = RewardResult(None, f"raised {payload}")
        elif not math.isfinite(payload):
            results[index] = RewardResult(None, f"non-finite reward {payload!r}")
        else:
            results[index] = RewardResult(payload)
