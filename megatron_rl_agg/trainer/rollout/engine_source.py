"""Rollouts from an inference engine (``--rollout-engine vllm``): requests, versions, async, sync, verify.

World rank 0 alone talks HTTP (:mod:`megatron_rl_agg.engine`). For step ``k`` it asks the engine for the
``n`` samples of each of the step's prompts (the text task's seeded prompt order, as the Megatron
generator's; prompt ``i`` sampled with a seed drawn from ``(--seed, k, "engine")``), and broadcasts every
row (response tokens, behaviour log-probs, finish reason) with the engine's weight version to all
ranks (:func:`megatron_rl_agg.engine.sync.rank0_call`: an engine error raises the same message on every
rank). Each DP rank then keeps its shard of the rows, as the on-policy source does, and scores them with
its reward workers. ``Sample.logprobs`` are the engine's (behaviour) log-probs; ``Sample.versions`` the
engine's version for every response token (``has_versions``, as an offline file with ``versions``: the
trainer's staleness metrics and ``--max-staleness``, :mod:`megatron_rl_agg.trainer.step.staleness`, read
them; one implementation for both sources).

Versions (v = optimizer steps applied to the weights that sampled a token; initial weights v = 0):
after step ``k`` trains, :meth:`EngineSource.after_step` syncs the weights (version ``k``). Synchronous
(``--async-rollouts 0``): step ``k``'s rows are requested after the sync of step ``k - 1``, version
``k - 1``, staleness ``(k - 1) - v = 0``. One step off (``--async-rollouts 1``): once step ``k``'s rows
are in, rank 0 requests step ``k + 1``'s in a thread while step ``k`` trains, with the weights of the
last completed sync (version ``k - 1``): staleness 1 from step 2. Before a sync rank 0 waits for that
request (vLLM's ``/pause?mode=wait`` would too), so each row's version is exact.

``--verify-sync``: after a sync, the log-probs of a probe sequence (global row 0 of the step: prompt and
response) under the engine (``prompt_logprobs``) and under the model (forward only, temperature 1) must
agree within ``--verify-sync-tol``; otherwise every rank raises, naming the version and the gap (a wrong
weight mapping or a sync that did not happen).
"""

from __future__ import annotations

import threading
import time
from typing import Optional, Sequence

import torch

from megatron_rl_agg.core.rows import shard_bounds
from megatron_rl_agg.engine.client import EngineClient, EngineError
from megatron_rl_agg.engine.sync import WeightSync, rank0_call
from megatron_rl_agg.trainer.rollout import generation
from megatron_rl_agg.trainer.rollout.rollouts import Sample
from megatron_rl_agg.trainer.rollout.sources import StepRows

__all__ = ["EngineSource", "prompt_seeds"]


def prompt_seeds(seed: int, step: int, num: int) -> list[int]:
    """The engine seed of each of ``num`` prompts of ``step``: counter-based, from ``(seed, step)`` only."""
    gen = generation.step_generator(seed, step, "engine")
    return torch.randint(0, 2 ** 31 - 1, (num,), generator=gen).tolist()


class _Pending:
    """One request in flight on rank 0 (a thread), its result or its exception kept for :meth:`take`."""

    def __init__(self, fn):
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except BaseException as err:            # noqa: BLE001 - re-raised on the main thread
            self.error = err

    def wait(self) -> None:
        self.thread.join()

    def take(self):
        self.wait()
        if self.error is not None:
            raise self.error
        return self.result


class EngineSource:
    """Mini-batches of whole prompt groups sampled by an inference engine (module docstring)."""

    has_logprobs = True
    has_versions = True      # every row's Sample.versions: the staleness metrics and --max-staleness apply

    def __init__(self, spec: generation.RolloutSpec, client: Optional[EngineClient], sync: WeightSync, *,
                 is_rank0: bool, device="cpu", async_rollouts: int = 0, train_iters: int,
                 mini_batches_per_step: int = 1, server=None, cleanup=None,
                 verify_tol: Optional[float] = None, micro_batch_size: int = 1, seq_length: int):
        self.spec, self.client, self.sync, self.server = spec, client, sync, server
        self._cleanup = cleanup
        self.is_rank0, self.device = is_rank0, device
        self.async_rollouts, self.train_iters = int(async_rollouts), int(train_iters)
        self.mini_batches_per_step = mini_batches_per_step
        self.expected_group_size = spec.samples_per_prompt
        self.verify_tol, self.micro_batch_size, self.seq_length = verify_tol, micro_batch_size, seq_length
        self._pending: dict[int, _Pending] = {}
        self._step: Optional[int] = None
        self._rows: Optional[dict] = None

    # ------------------------------------------------------------------------------ rank 0: requests
    def _request(self, step: int) -> dict:
        """Rank 0: every row of ``step`` from the engine at its current weights."""
        spec = self.spec
        prompts = generation.step_prompts(spec, step)
        version = self.sync.version
        out = self.client.generate([list(p) for p in prompts], n=spec.samples_per_prompt,
                                   temperature=spec.temperature, max_tokens=spec.max_new_tokens,
                                   stop_token_ids=getattr(spec.task, "eos_ids", ()),
                                   seeds=prompt_seeds(spec.seed, step, len(prompts)))
        rows = [(c.token_ids, c.logprobs, c.finish_reason) for per_prompt in out for c in per_prompt]
        return {"step": step, "version": version, "rows": rows}

    def _take(self, step: int) -> dict:
        pending = self._pending.pop(step, None)
        rows = pending.take() if pending is not None else self._request(step)
        if self.async_rollouts and step + 1 <= self.train_iters:
            self._pending[step + 1] = _Pending(lambda: self._request(step + 1))
        return rows

    # ------------------------------------------------------------------------------ every rank
    def step_rows(self, step: int) -> dict:
        """``{"version", "rows": [(response, logprobs, finish)] * num_rows}`` of ``step`` on every rank."""
        if self._step != step:
            self._rows = rank0_call(lambda: self._take(step), is_rank0=self.is_rank0, device=self.device)
            self._step = step
        return self._rows

    def local_rows(self, step: int, index: int, dp_size: int, dp_rank: int,
                   chunks: Sequence = ()) -> StepRows:
        """This DP rank's rows of mini-batch ``index`` of ``step`` (the shards of the on-policy source)."""
        spec, n = self.spec, self.spec.samples_per_prompt
        got = self.step_rows(step)
        prompts = generation.step_prompts(spec, step)
        lost = torch.rand(spec.num_rows, generator=generation.step_generator(spec.seed, step, "failure")) \
            < spec.failure_prob
        per_batch = spec.num_rows // self.mini_batches_per_step
        lo, hi = shard_bounds(per_batch, dp_size, dp_rank)
        start, end = index * per_batch + lo, index * per_batch + hi
        kept = [g for g in range(start, end) if not bool(lost[g])]
        rewards = generation.score_responses(spec.task, [prompts[g // n] for g in kept],
                                             [got["rows"][g][0] for g in kept])
        samples = []
        for g, (reward, error) in zip(kept, rewards):
            response, logprobs, finish = got["rows"][g]
            samples.append(Sample(g // n, tuple(prompts[g // n]), tuple(response), reward, finish,
                                  tuple(logprobs), f"step {step} row {g}", error,
                                  versions=(got["version"],) * len(response)))
        return StepRows(samples, [g // n for g in kept], int(lost[start:end].sum()))

    def row_prompt(self, step: int, row: int) -> str:
        prompt = generation.step_prompts(self.spec, step)[row // self.spec.samples_per_prompt]
        return getattr(prompt, "text", None) or str(list(prompt))

    def after_step(self, step: int, chunks: Sequence, export) -> dict:
        """After step ``step`` trained: sync the weights into the engine (version ``step``; not after the
        run's last step), verify with ``--verify-sync``; returns the step's engine metrics:
        ``rollout_version`` (the version that sampled the step's rows; their staleness is in the step's
        ``staleness_*`` metrics, :mod:`megatron_rl_agg.trainer.step.staleness`), and after a sync
        ``engine_version``, ``engine_wait_s`` (rank 0's wait for the request in flight, ``--async-rollouts
        1``), ``sync_export_s``, ``sync_reload_s`` (and ``verify_sync_max_diff``)."""
        got = self.step_rows(step)
        metrics = {"rollout_version": got["version"]}   # staleness: the loss's staleness_* metrics
        if step >= self.train_iters:
            return metrics
        waited = time.perf_counter()
        if self.is_rank0 and step + 1 in self._pending:
            self._pending[step + 1].wait()        # its rows keep the version they were sampled with
        waited = time.perf_counter() - waited
        self.sync.sync(export, step)
        metrics.update({"engine_version": self.sync.version, "engine_wait_s": waited, **self.sync.last_seconds})
        if self.verify_tol is not None:
            metrics["verify_sync_max_diff"] = self.verify(chunks, step)
        return metrics

    def verify(self, chunks: Sequence, step: int) -> float:
        """``max |logp_engine - logp_model|`` over the probe (global row 0 of ``step``); raises on every
        rank above ``--verify-sync-tol``."""
        from megatron_rl_agg.mcore import forward

        got = self.step_rows(step)
        probe = list(generation.step_prompts(self.spec, step)[0]) + list(got["rows"][0][0])
        probe = probe[: self.seq_length + 1]
        engine = rank0_call(lambda: self.client.score([probe])[0], is_rank0=self.is_rank0, device=self.device)
        rows = self.micro_batch_size * forward.microbatch_multiple()
        tokens = torch.zeros(rows, self.seq_length, dtype=torch.int64)
        labels = torch.zeros(rows, self.seq_length, dtype=torch.int64)
        tokens[:, : len(probe) - 1] = torch.tensor(probe[:-1])
        labels[:, : len(probe) - 1] = torch.tensor(probe[1:])
        from megatron_rl_agg.mcore import cpu_mode

        model = forward.compute_logprobs(chunks, tokens.to(cpu_mode.device()), labels.to(cpu_mode.device()),
                                         self.micro_batch_size, temperature=1.0)[0, : len(probe) - 1].cpu()
        diff = float((model.double() - torch.tensor(engine, dtype=torch.float64)).abs().max())
        if not diff <= self.verify_tol:
            raise EngineError(
                f"--verify-sync: after the sync to version {self.sync.version} (step {step}) the engine's "
                f"log-probs of the probe ({len(probe)} tokens) differ from the model's by {diff:.3g} > "
                f"--verify-sync-tol {self.verify_tol:g}: the engine does not hold the trained weights (a sync "
                "that did not happen or a wrong weight mapping)")
        return diff

    def close(self) -> None:
        """Wait for a request in flight, stop the reward workers, then the server this run launched and the
        sync directory it made (``cleanup``)."""
        try:
            for pending in self._pending.values():
                pending.thread.join(timeout=(self.client.timeout if self.client else 0) + 5)
            self._pending.clear()
            close = getattr(self.spec.task, "close", None)
            if close is not None:
                close()
        finally:
            if self._cleanup is not None:
                self._cleanup()
