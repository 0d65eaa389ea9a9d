"""On-policy rollouts: the Megatron model samples ``n`` responses per prompt, at any TP / PP / VPP layout.

Sampling is *counter-based*: every random draw of step ``k`` comes from a generator seeded with
``(seed, k, purpose)`` only, and the sampling noise of a row is indexed by its global row number. So the
prompts, the sampled tokens (given the logits), and which samples the simulated rollout service loses
depend on ``--seed`` and the step alone, never on the parallel layout or on how many steps ran before in
this process; a run resumed from a checkpoint draws exactly what the uninterrupted run drew.

Token sampling is the Gumbel-max trick: ``argmax_v(z_v / T + g_v)`` with ``g_v = -log(-log(u_v))`` and
``u_v`` uniform is a draw from ``softmax(z / T)``. The last pipeline stage gathers the full-vocabulary
logits over TP (fine at this size), every TP rank there draws the same token from the same noise, and
:func:`~megatron_rl_agg.mcore.forward.broadcast_from_last_stage` hands it to the other stages.

Generation is KV-cached by default (Megatron-Core's ``StaticInferenceContext``, the cache its static
inference engine uses, at any TP / PP / VPP layout; under context parallelism the prefix is recomputed): one prefill pass over the first ``min_len`` tokens
(``min_len`` the shortest prompt), then one pass of ONE token per position, each attending to the cached
keys and values. Rows are right-aligned in time: at position ``t`` a row whose prompt is longer than
``t + 1`` feeds its next prompt token, and a row whose prompt ended samples its response token
``j = t - (len - 1)`` from the logits there with the noise of ``j``, exactly the draw of the recompute
path, which runs the whole ``[R, S]`` prefix again for every new token (``kv_cache=False``; quadratic in
the response length, kept as the reference the cached path is tested against). Rows are right-padded,
attention is causal, so the logits at a row's last real position never see the padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_rl_agg.core.seeds import seeded_generator
from megatron_rl_agg.parallel import dist
from megatron_rl_agg.mcore import compat
from megatron_rl_agg.mcore import forward
from megatron_rl_agg.trainer.rollout import task
from megatron_rl_agg.core.rows import shard_bounds
from megatron_rl_agg.trainer.rollout.rollouts import Sample

__all__ = ["step_generator", "RolloutSpec", "GumbelNoise", "sample_tokens", "generate", "step_prompts",
           "on_policy_rows", "score_responses"]


def step_generator(seed: int, step: int, purpose: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, step, purpose)`` only (SHA-256, so streams never overlap)."""
    return seeded_generator(seed, step, purpose)          # sha256(f"{seed}/{step}/{purpose}")


@dataclass(frozen=True, kw_only=True)
class RolloutSpec:
    """What one on-policy step generates."""

    task: task.CountingTask
    """The counting task, or a text prompt file's ``megatron_rl_agg.hf.prompts.TextTask``."""
    num_prompts: int
    """Prompts per step (``--global-batch-size / --num-samples-per-prompt``)."""
    samples_per_prompt: int
    max_new_tokens: int
    temperature: float
    failure_prob: float
    vocab_size: int
    seed: int

    @property
    def num_rows(self) -> int:
        return self.num_prompts * self.samples_per_prompt


class GumbelNoise:
    """Gumbel noise ``g = -log(-log(u))`` of the global rows ``[start, end)`` of ``step``, drawn one decode
    step at a time: :meth:`draw` gives ``[rows, V]`` float64 for one position per row.

    The values are those of ONE uniform draw ``u = torch.rand((R, N, V), dtype=float64)`` from
    ``step_generator(seed, step, "sample")`` (``R = spec.num_rows``, ``N = max_new_tokens``,
    ``V = vocab_size``), clamped to ``>= 1e-300`` so ``g`` stays finite; row ``g`` position ``j`` is
    ``u[g, j]``. That is what the generator drew before this class: the same tokens for the same seed,
    and the draw of a row still depends on its global row number only (any DP layout draws the same).
    The CPU generator fills a tensor in row-major order, a fixed number of Mersenne Twister outputs per
    element, so row ``g`` begins ``g * N * V`` elements into the stream: on the first draw the generator
    is advanced to row ``start`` (drawn and discarded in blocks of at most ``BLOCK`` elements) and then
    through this rank's rows, keeping each row's generator (its ~5 kB state) at its start; each later
    draw of a row takes the next ``V`` elements of its own generator. So a row's positions must be drawn
    in order ``0, 1, 2, ...`` (each at most once; generation does exactly that).

    Memory: ``[end - start, V]`` float64 per draw, a ``BLOCK`` buffer and the row states, whatever the
    step's total rows ``R`` (the old ``[R, N, V]`` tensor was 37 GiB per rank for the README's Qwen
    example). Time: the skip generates the ``end * N * V`` uniforms before this rank's last row once
    (the old tensor generated all ``R * N * V`` on every rank); only the last pipeline stage draws, so
    the other stages never pay it. Everything is on the host, as the sampling is.
    """

    BLOCK = 2**20

    def __init__(self, spec: RolloutSpec, step: int, start: int, end: int):
        if not 0 <= start <= end <= spec.num_rows:
            raise ValueError(f"rows [{start}, {end}) are not within the step's {spec.num_rows} rows")
        self.spec, self.step, self.start, self.end = spec, step, start, end
        self.vocab_size = spec.vocab_size
        self._rows: Optional[list[torch.Generator]] = None
        self._next = torch.zeros(end - start, dtype=torch.int64)        # next position of each row

    def _row_generators(self) -> list[torch.Generator]:
        gen = step_generator(self.spec.seed, self.step, "sample")
        per_row = self.spec.max_new_tokens * self.vocab_size
        buffer = torch.empty(min(self.BLOCK, max(per_row * self.start, per_row)), dtype=torch.float64)
        rows = []
        skip = per_row * self.start
        for _ in range(self.end - self.start):
            while skip > 0:
                n = min(skip, buffer.numel())
                torch.rand(n, generator=gen, dtype=torch.float64, out=buffer[:n])
                skip -= n
            row = torch.Generator()
            row.set_state(gen.get_state())
            rows.append(row)
            skip = per_row
        return rows

    def draw(self, positions: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """``[rows, V]`` float64: row ``i``'s noise at position ``positions[i]`` where ``active[i]``, else 0.

        Args:
            positions: ``[rows]`` int64, the response index each row samples (only active rows are read).
            active: ``[rows]`` bool, the rows that sample now.

        Raises:
            RuntimeError: an active row asks for another position than its next one (out of order, twice
                or past ``max_new_tokens``).
        """
        if self._rows is None:
            self._rows = self._row_generators()
        out = torch.zeros(self.end - self.start, self.vocab_size, dtype=torch.float64)
        for i in torch.nonzero(active).flatten().tolist():
            j = int(positions[i])
            if j != int(self._next[i]) or j >= self.spec.max_new_tokens:
                raise RuntimeError(f"row {self.start + i} asks for the noise of position {j}; its next is "
                                   f"{int(self._next[i])} of {self.spec.max_new_tokens} (positions are drawn in order)")
            torch.rand(self.vocab_size, generator=self._rows[i], dtype=torch.float64, out=out[i])
            self._next[i] = j + 1
        rows = active.nonzero().flatten()
        out[rows] = -torch.log(-torch.log(out[rows].clamp(min=1e-300)))
        return out


class _FixedNoise:
    """A given ``[rows, N, V]`` noise tensor behind :meth:`GumbelNoise.draw`'s interface (tests and
    benchmarks pass fixed noise to :func:`generate`): any position, in any order."""

    def __init__(self, noise: torch.Tensor):
        self.noise = noise
        self.vocab_size = noise.shape[-1]

    def draw(self, positions: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(self.noise.shape[0])
        return self.noise[rows, positions.clamp(0, self.noise.shape[1] - 1)]


def sample_tokens(logits: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """Gumbel-max draw: ``[b]`` int64 ``argmax(logits / T + noise)`` for ``[b, V]`` logits and noise."""
    return torch.argmax(logits.double() / temperature + noise, dim=-1)


def _last_position_logits(logits: torch.Tensor, micro_batch: dict) -> torch.Tensor:
    """Full-vocabulary logits at each row's position ``positions[b]``: ``[b, V]`` (TP-gathered).

    Under context parallelism the logits are this CP rank's zigzag shard: the rank holding the global
    position (``position_ids`` of the shard) contributes its logits, the others zeros, and a sum over the
    CP group gives every CP rank the row (``x + 0 == x`` exactly).
    """
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    rows = torch.arange(logits.shape[0], device=logits.device)
    group, cp_size, _ = compat.parallel_group("cp")
    if cp_size == 1:
        picked = logits[rows, micro_batch["positions"]].float()             # [b, V / tp]
    else:
        held = micro_batch["position_ids"] == micro_batch["positions"].unsqueeze(1)      # [b, s]
        local = held.long().argmax(dim=1)                                   # index in the shard (if held)
        picked = torch.where(held.any(dim=1, keepdim=True), logits[rows, local].float(), 0.0)
        picked = dist.all_reduce_sum(picked, group)
    return gather_from_tensor_model_parallel_region(picked)                 # [b, V]


def _cached_last_logits(logits: torch.Tensor, micro_batch: dict) -> torch.Tensor:
    """``[b, V]``: a cached pass materializes the full-vocabulary logits of its last position only."""
    return logits[:, -1].float()


@torch.no_grad()
def generate(chunks: Sequence, prompts: Sequence[Sequence[int]], noise, *,
             seq_length: int, max_new_tokens: int, temperature: float,
             micro_batch_rows: int, kv_cache: Optional[bool] = None,
             eos_ids: Sequence[int] = (task.EOS,)) -> list[tuple[list[int], str]]:
    """Sample one response per prompt with the model; returns ``[(response, finish_reason)]``.

    Args:
        prompts: ``R`` prompts (this rank's rows); ``len(prompt) + max_new_tokens <= seq_length + 1``.
        noise: the Gumbel noise of these rows: a :class:`GumbelNoise` (drawn one position at a time) or a
            ``[R, max_new_tokens, V]`` tensor; logits past ``V`` (TP vocabulary padding of an imported
            model) are never sampled.
        micro_batch_rows: rows per forward micro-batch; ``R`` is padded to a multiple of it times
            :func:`~megatron_rl_agg.mcore.forward.microbatch_multiple`.
        kv_cache: KV-cached decoding; False recomputes the prefix for every token. Both draw the same
            tokens from the same logits (see the module docstring). None (default): the cache, except
            under context parallelism, where Megatron's static KV cache (whole sequences per rank) does
            not apply and the prefix is recomputed, each CP rank holding its zigzag shard.
        eos_ids: token ids that end a response (a tokenizer's EOS and ``generation_config``'s).

    A response ends at its first EOS (included, finish ``"stop"``) or after ``max_new_tokens`` tokens
    (finish ``"length"``). All model-parallel ranks of a pipeline see the same tokens, so they leave the
    loop at the same step; nothing here communicates across DP ranks.
    """
    num = len(prompts)
    if isinstance(noise, torch.Tensor):
        noise = _FixedNoise(noise)
    block = micro_batch_rows * forward.microbatch_multiple()
    padded = max(1, -(-num // block)) * block
    tokens = torch.zeros(padded, seq_length, dtype=torch.int64)
    lengths = torch.ones(padded, dtype=torch.int64)          # padding rows: a 1-token dummy prompt
    for i, p in enumerate(prompts):
        if len(p) + max_new_tokens > seq_length + 1:
            raise ValueError(f"prompt of {len(p)} tokens + --max-new-tokens {max_new_tokens} exceed "
                             f"--seq-length {seq_length} + 1")
        tokens[i, : len(p)] = torch.tensor(list(p), dtype=torch.int64)
        lengths[i] = len(p)
    cp_size = compat.parallel_group("cp")[1]
    if kv_cache is None:
        kv_cache = cp_size == 1
    if kv_cache and cp_size > 1:
        raise ValueError(f"kv_cache=True needs context_parallel_size 1, got {cp_size}: Megatron's static KV "
                         "cache holds whole sequences; pass kv_cache=None or False under CP")
    if kv_cache:
        return _generate_cached(chunks, tokens, lengths, num, noise, seq_length=seq_length,
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                micro_batch_rows=micro_batch_rows, eos_ids=eos_ids)
    responses: list[list[int]] = [[] for _ in range(num)]
    done = torch.zeros(num, dtype=torch.bool)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.int64)
    for j in range(max_new_tokens):
        logits = forward.run_forward_only(chunks, tokens, micro_batch_rows, _last_position_logits,
                                          extra={"positions": lengths - 1})
        if logits is not None:   # last stage: sample on the host, where the noise lives
            picked = noise.draw(torch.full((num,), j, dtype=torch.int64), ~done)
            logits = sample_tokens(logits[:num, : noise.vocab_size].cpu(), picked, temperature)
        nxt = forward.broadcast_from_last_stage(logits, (num,), torch.int64).cpu()
        for i in torch.nonzero(~done).flatten().tolist():
            responses[i].append(int(nxt[i]))
        done |= torch.isin(nxt, eos)
        if bool(done.all()) or j == max_new_tokens - 1:
            break
        writable = lengths[:num] < seq_length
        tokens[torch.arange(num)[writable], lengths[:num][writable]] = nxt[writable]
        lengths[:num] += 1
    eos_set = set(eos.tolist())
    return [(r, "stop" if r and r[-1] in eos_set else "length") for r in responses]


def step_prompts(spec: RolloutSpec, step: int) -> list:
    """The step's prompts: a text prompt file's seeded epoch order (``megatron_rl_agg.hf.prompts``), or
    the counting task's draws."""
    if hasattr(spec.task, "step_prompts"):
        return spec.task.step_prompts(spec.num_prompts, step)
    return spec.task.sample_prompts(spec.num_prompts, step_generator(spec.seed, step, "prompts"))


def _generate_cached(chunks, tokens, lengths, num, noise, *, seq_length, max_new_tokens, temperature,
                     micro_batch_rows, eos_ids):
    """The KV-cached loop of :func:`generate` (``tokens`` ``[R', S]`` right-padded, ``lengths`` ``[R']``).

    Pass ``k`` feeds position ``t = min_len - 1 + k`` (the prefill feeds ``0 .. min_len - 1``) and gets
    the logits there; row ``i`` samples its token ``j = t - (len_i - 1)`` when ``0 <= j`` and it has not
    finished, and a row that is still inside its prompt at ``t + 1`` feeds its prompt token there.
    Every rank of the pipeline runs the same passes (the control flow depends only on the prompts and
    on the sampled tokens, which every stage receives).
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    if num == 0:
        return []
    chunk_list = list(chunks)
    modes = [c.training for c in chunk_list]
    for c in chunk_list:
        c.eval()          # Megatron applies the inference context only to modules in eval mode
    try:
        context = StaticInferenceContext(tokens.shape[0], seq_length)
        real = lengths[:num]
        t = int(real.min()) - 1
        step_tokens = tokens[:, :t + 1]
        responses: list[list[int]] = [[] for _ in range(num)]
        finished = torch.zeros(num, dtype=torch.bool)
        rows = torch.arange(num)
        eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.int64)
        while True:
            logits = forward.run_forward_only(chunk_list, step_tokens, micro_batch_rows, _cached_last_logits,
                                              inference_context=context,
                                              position_offset=t + 1 - step_tokens.shape[1])
            context.sequence_len_offset += step_tokens.shape[1]
            j = t - (real - 1)                                    # response index sampled at t, per row
            sampling = (j >= 0) & ~finished
            if logits is not None:   # last stage: sample on the host, where the noise lives
                picked = noise.draw(j.clamp(0, max_new_tokens - 1), sampling)
                logits = sample_tokens(logits[:num, : noise.vocab_size].cpu(), picked, temperature)
            nxt = forward.broadcast_from_last_stage(logits, (num,), torch.int64).cpu()
            for i in torch.nonzero(sampling).flatten().tolist():
                responses[i].append(int(nxt[i]))
            finished |= sampling & (torch.isin(nxt, eos) | (j == max_new_tokens - 1))
            if bool(finished.all()):
                break
            t += 1
            generated = rows[real <= t]                           # rows whose position t is a response token
            tokens[generated, t] = nxt[generated]
            step_tokens = tokens[:, t:t + 1]
    finally:
        for c, mode in zip(chunk_list, modes):
            c.train(mode)
    eos_set = set(eos.tolist())
    return [(r, "stop" if r and r[-1] in eos_set else "length") for r in responses]


def on_policy_rows(chunks: Sequence, spec: RolloutSpec, step: int, rows: tuple[int, int], *, dp_size: int,
                   dp_rank: int, seq_length: int, micro_batch_rows: int
                   ) -> tuple[list[Sample], list[int], int]:
    """This DP rank's surviving rollout rows among the global rows ``rows = [lo, hi)`` of ``step``.

    Global row ``g`` belongs to prompt ``g // n``; rank ``r`` generates the rows
    ``lo + shard_bounds(hi - lo, D, r)`` (one mini-batch of the step is one such range).
    Each row is then lost with probability ``failure_prob`` (drawn per global row), as a rollout service
    that drops samples; its group becomes partial, and a group that loses every sample disappears.

    Returns:
        ``(samples, group_ids, num_failed)``: surviving samples in global row order with their prompt
        index as group id, and how many of this rank's rows were lost.
    """
    prompts = step_prompts(spec, step)
    lost = torch.rand(spec.num_rows, generator=step_generator(spec.seed, step, "failure")) < spec.failure_prob
    lo, hi = shard_bounds(rows[1] - rows[0], dp_size, dp_rank)
    start, end = rows[0] + lo, rows[0] + hi
    rows = range(start, end)
    n = spec.samples_per_prompt
    outputs = generate(chunks, [prompts[g // n] for g in rows], GumbelNoise(spec, step, start, end),
                       seq_length=seq_length, max_new_tokens=spec.max_new_tokens,
                       temperature=spec.temperature, micro_batch_rows=micro_batch_rows,
                       eos_ids=getattr(spec.task, "eos_ids", (task.EOS,)))
    kept = [(g, response, finish) for g, (response, finish) in zip(rows, outputs) if not bool(lost[g])]
    rewards = score_responses(spec.task, [prompts[g // n] for g, _, _ in kept], [r for _, r, _ in kept])
    samples, gids = [], []
    for (g, response, finish), (reward, error) in zip(kept, rewards):
        samples.append(Sample(g // n, tuple(prompts[g // n]), tuple(response), reward, finish, None,
                              f"step {step} row {g}", error))
        gids.append(g // n)
    return samples, gids, int(lost[start:end].sum())


def score_responses(rollout_task, prompts: Sequence, responses: Sequence) -> list[tuple[float, Optional[str]]]:
    """``[(reward, error)]`` of the responses: a text task's rewards come from its reward workers in one
    batch (``TextTask.rewards``; a failed sample gets ``(nan, why)``), the counting task's from
    :func:`.task.reward`."""
    if hasattr(rollout_task, "rewards"):
        return [(r.value, None) if r.ok else (float("nan"), r.error)
                for r in rollout_task.rewards(prompts, responses)]
    score = getattr(rollout_task, "reward", task.reward)
    return [(score(p, r), None) for p, r in zip(prompts, responses)]
