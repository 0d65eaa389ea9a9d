"""Where a step's rows come from: an offline JSONL file, or on-policy generation by the model.

Both give each data-parallel rank its own rows of the step's mini-batch, with global prompt-group ids
(equal on every rank for one group; a group may straddle two ranks), so advantages and aggregation
weights are computed over the whole mini-batch with DP collectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_rl_agg.trainer.rollout import generation, rollouts
from megatron_rl_agg.core.rows import shard_bounds
from megatron_rl_agg.trainer.rollout.rollouts import Sample

__all__ = ["StepRows", "OfflineSource", "OnPolicySource"]


@dataclass(frozen=True)
class StepRows:
    """This rank's rows of one step."""

    samples: list[Sample]
    group_ids: list[int]
    num_failed: int = 0
    """Rows this rank lost to simulated rollout failures (on-policy only)."""


class OfflineSource:
    """Mini-batches of whole prompt groups read from a JSONL rollout file.

    The file's groups are packed in order into mini-batches of at most ``--global-batch-size`` rows
    (:func:`~megatron_rl_agg.trainer.rollout.rollouts.plan_minibatches`); with ``K = --mini-batches-per-step``,
    mini-batch ``j`` of step ``k`` (from 1) is planned mini-batch ``((k - 1) K + j) mod num_batches``, so a
    run longer than one pass starts the file again. Group ids are the group's index in the file.
    """

    expected_group_size: Optional[int] = None

    def __init__(self, path: str, global_batch_size: int, vocab_size: int, mini_batches_per_step: int = 1,
                 tokenize=None):
        self.samples = rollouts.read_rollouts(path, vocab_size=vocab_size, tokenize=tokenize)
        with_lp = {s.logprobs is not None for s in self.samples}
        if len(with_lp) > 1:
            first = next(s for s in self.samples if s.logprobs is None)
            raise rollouts.RolloutFormatError(
                f"{first.source}: no 'logprobs', but other lines of {path} have them; give log-probs for "
                "every line or for none (without them they are recomputed with the current model)")
        with_versions = [s.versions is not None for s in self.samples]
        if any(with_versions) and not all(with_versions):
            first = self.samples[with_versions.index(False)]
            raise rollouts.RolloutFormatError(
                f"{first.source}: no 'versions', but other lines of {path} have them; give policy versions "
                "for every line or for none")
        spans = rollouts.group_spans(self.samples)
        self.group_of_row = [g for g, (a, b) in enumerate(spans) for _ in range(a, b)]
        self.batches = rollouts.plan_minibatches(spans, global_batch_size)
        self.mini_batches_per_step = mini_batches_per_step

    @property
    def has_logprobs(self) -> bool:
        return self.samples[0].logprobs is not None

    @property
    def has_versions(self) -> bool:
        """Whether the rows carry per-token policy versions (the file's ``versions`` key)."""
        return self.samples[0].versions is not None

    def check_versions(self, train_iters: int) -> None:
        """Refuse, before step 1, a row whose policy version is above ``k - 1`` at a step ``k`` of
        ``1..train_iters`` that uses it (training step ``k`` updates the weights of version ``k - 1``: a
        higher version was sampled by weights this run has not made yet, a negative staleness).

        Raises:
            RolloutFormatError: naming the row (file and line), the version, the step and the bound.
        """
        if not self.has_versions:
            return
        newest = []          # per planned mini-batch: (highest version, its row)
        for a, b in self.batches:
            row = max(range(a, b), key=lambda i: max(self.samples[i].versions, default=-1))
            newest.append((max(self.samples[row].versions, default=-1), self.samples[row]))
        first_step = {}      # planned mini-batch -> first step that uses it
        for step in range(1, train_iters + 1):
            for index in range(self.mini_batches_per_step):
                j = ((step - 1) * self.mini_batches_per_step + index) % len(self.batches)
                first_step.setdefault(j, step)
            if len(first_step) == len(self.batches):
                break
        for j, step in sorted(first_step.items(), key=lambda item: item[1]):
            version, sample = newest[j]
            if version > step - 1:
                raise rollouts.RolloutFormatError(
                    f"{sample.source}: policy version {version} is above {step - 1}, the version step {step} "
                    f"trains from (step k updates version k - 1 to k; the row is used first at step {step}): "
                    "a version counts the optimizer steps applied to the weights that sampled the token")

    def batch_rows(self, step: int, index: int = 0) -> tuple[int, int]:
        """Global file rows of mini-batch ``index`` of step ``step`` (1-based)."""
        return self.batches[((step - 1) * self.mini_batches_per_step + index) % len(self.batches)]

    def local_rows(self, step: int, index: int, dp_size: int, dp_rank: int,
                   chunks: Sequence = ()) -> StepRows:
        """This rank's rows of mini-batch ``index`` of step ``step`` (``chunks`` is unused)."""
        a, b = self.batch_rows(step, index)
        lo, hi = shard_bounds(b - a, dp_size, dp_rank)
        rows = range(a + lo, a + hi)
        return StepRows([self.samples[i] for i in rows], [self.group_of_row[i] for i in rows])


class OnPolicySource:
    """Rows sampled by the policy itself on the counting task (see :mod:`.generation`)."""

    has_logprobs = False

    def __init__(self, spec: generation.RolloutSpec, seq_length: int, micro_batch_rows: int,
                 mini_batches_per_step: int = 1):
        self.spec = spec
        self.mini_batches_per_step = mini_batches_per_step
        self.seq_length = seq_length
        self.micro_batch_rows = micro_batch_rows
        self.expected_group_size = spec.samples_per_prompt

    def local_rows(self, step: int, index: int, dp_size: int, dp_rank: int,
                   chunks: Sequence = ()) -> StepRows:
        """Generate this rank's rows of mini-batch ``index`` of step ``step`` with the model ``chunks``.

        The step's ``K x --global-batch-size`` rows are ``K`` consecutive ranges of whole prompt groups.
        """
        per_batch = self.spec.num_rows // self.mini_batches_per_step
        samples, gids, failed = generation.on_policy_rows(
            chunks, self.spec, step, (index * per_batch, (index + 1) * per_batch), dp_size=dp_size,
            dp_rank=dp_rank, seq_length=self.seq_length, micro_batch_rows=self.micro_batch_rows)
        return StepRows(samples, gids, failed)

    def row_prompt(self, step: int, row: int) -> str:
        """The prompt of global row ``row`` of step ``step`` (its text, or its token ids), the same on
        every rank: for error messages."""
        prompt = generation.step_prompts(self.spec, step)[row // self.spec.samples_per_prompt]
        return getattr(prompt, "text", None) or str(list(prompt))

    def close(self) -> None:
        """Stop the reward workers of a text task (nothing to stop for the counting task)."""
        close = getattr(self.spec.task, "close", None)
        if close is not None:
            close()
