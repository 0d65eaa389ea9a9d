"""Layer 2: single-process invariance. Weights computed per simulated DP rank (threads standing in for
ranks, exchanging through the same collective wrappers the real code uses) and summed over ranks and
micro-batches reproduce the single-process ``aggregate`` of the whole mini-batch."""

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_rl_agg import LOSS_AGGREGATIONS, aggregate, microbatch_mean_weights, token_weights
from megatron_rl_agg.parallel import dist as agg_dist

GLOBAL_MODES = [m for m in LOSS_AGGREGATIONS if m != "token_mean_legacy"]


class ThreadGroup:
    """A process group of ``size`` threads: each collective is a rendezvous of all of them."""

    def __init__(self, size: int):
        self.size = size
        self._slots = [None] * size
        self._barrier = threading.Barrier(size)
        self._local = threading.local()
        self.calls = [0] * size

    def exchange(self, tensor):
        r = self._local.rank
        self.calls[r] += 1
        self._slots[r] = tensor
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()
        return out

    def run(self, fn, per_rank_args):
        results, errors = [None] * self.size, []

        def target(r):
            self._local.rank = r
            try:
                results[r] = fn(*per_rank_args[r])
            except BaseException as exc:  # surface worker failures in the main thread
                errors.append(exc)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@pytest.fixture
def thread_collectives(monkeypatch):
    """Route megatron_rl_agg.parallel.dist through ThreadGroup when given one (identity for group=None)."""
    def world_size(group=None):
        return group.size if isinstance(group, ThreadGroup) else 1

    def all_reduce_sum(t, group=None):
        return torch.stack(group.exchange(t)).sum(0) if isinstance(group, ThreadGroup) else t

    def rank(group=None):
        return group._local.rank if isinstance(group, ThreadGroup) else 0

    def all_gather(rows, group=None):
        return torch.cat(group.exchange(rows)) if isinstance(group, ThreadGroup) else rows

    monkeypatch.setattr(agg_dist, "world_size", world_size)
    monkeypatch.setattr(agg_dist, "rank", rank)
    monkeypatch.setattr(agg_dist, "all_reduce_sum", all_reduce_sum)
    monkeypatch.setattr(agg_dist, "all_gather_varlen", all_gather)
    monkeypatch.setattr(agg_dist, "all_gather_fixed", all_gather)


@st.composite
def minibatches(draw):
    """Rows of 0..T loss tokens (fully masked and one-token rows likely), contiguous prompt groups,
    and a split of the rows over k ranks that may cut through a group or leave a rank empty."""
    n_rows = draw(st.integers(1, 12))
    width = draw(st.integers(1, 6))
    mask = torch.zeros(n_rows, width, dtype=torch.int64)
    for i in range(n_rows):
        kind = draw(st.sampled_from(["masked", "one", "prefix", "random"]))
        if kind == "one":
            mask[i, draw(st.integers(0, width - 1))] = 1
        elif kind == "prefix":
            mask[i, : draw(st.integers(1, width))] = 1
        elif kind == "random":
            mask[i] = torch.tensor(draw(st.lists(st.integers(0, 1), min_size=width, max_size=width)))
    sizes, left = [], n_rows
    while left:
        s = draw(st.integers(1, left))
        sizes.append(s)
        left -= s
    seed = draw(st.integers(0, 2**31 - 1))
    values = torch.randn(n_rows, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    k = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(st.integers(0, n_rows), min_size=k - 1, max_size=k - 1)))
    bounds = [0] + cuts + [n_rows]
    mbs = draw(st.integers(1, 4))
    horizon = draw(st.integers(width, width + 5))
    return values, mask, sizes, bounds, mbs, horizon


def _rank_objective(values, mask, gids, mode, mbs, horizon, group):
    """What one DP rank contributes: weights once per mini-batch, then summed micro-batch by micro-batch."""
    w = token_weights(mask, mode, group_ids=gids, max_response_length=horizon, process_group=group,
                      dtype=torch.float64)
    parts = [(w[s:s + mbs] * values[s:s + mbs]).sum() for s in range(0, mask.shape[0], mbs)]
    return torch.stack(parts).sum() if parts else values.new_zeros(())


@pytest.mark.parametrize("mode", GLOBAL_MODES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=minibatches(), descending=st.booleans())
def test_weights_over_ranks_and_microbatches_equal_aggregate(thread_collectives, mode, batch, descending):
    values, mask, sizes, bounds, mbs, horizon = batch
    # arbitrary ids; ascending ones take the boundary exchange, descending ones the gather of every bucket
    gids = torch.repeat_interleave(torch.arange(len(sizes)) * 7 + 3, torch.tensor(sizes))
    if descending:
        gids = 1000 - gids
    k = len(bounds) - 1
    group = ThreadGroup(k)
    args = [(values[a:b], mask[a:b], gids[a:b], mode, mbs, horizon, group) for a, b in zip(bounds, bounds[1:])]
    total = torch.stack(group.run(_rank_objective, args)).sum()
    ref = aggregate(values, mask, mode, group_sizes=sizes, max_response_length=horizon)
    assert torch.allclose(total, ref, rtol=1e-10, atol=1e-12), (total, ref)
    # counts are reduced once per mini-batch, whatever the number of micro-batches
    fallback = descending and k > 1 and len(sizes) > 1        # ids out of order: + the full gather
    expected_calls = {"token_sum": 0, "prompt_mean": 2 + fallback}.get(mode, 1)
    assert group.calls == [expected_calls] * k


@settings(max_examples=60, deadline=None)
@given(batch=minibatches())
def test_legacy_is_the_mean_of_microbatch_means(batch):
    """token_mean_legacy = what Megatron computes from per-micro-batch token means: each micro-batch's
    mean, divided by the number of micro-batches M over all ranks (equal micro-batch counts per rank)."""
    values, mask, _, _, mbs, _ = batch
    starts = range(0, mask.shape[0], mbs)
    total = sum((microbatch_mean_weights(mask[s:s + mbs], torch.float64) * values[s:s + mbs]).sum()
                for s in starts) / len(starts)
    assert torch.allclose(total, aggregate(values, mask, "token_mean_legacy", micro_batch_size=mbs))


def test_group_split_across_ranks_by_hand(thread_collectives):
    """One prompt group cut by the rank boundary: rank 0 holds rows 0-1 (2 + 1 tokens), rank 1 holds
    row 2 (3 tokens) of the same group plus a second group (row 3, 1 token).
    prompt_mean weights: 2 live groups; group A has 6 tokens -> 1/(2*6); group B 1 token -> 1/2."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0]])
    gids = torch.tensor([5, 5, 5, 9])
    group = ThreadGroup(2)
    out = group.run(lambda m, g: token_weights(m, "prompt_mean", group_ids=g, process_group=group,
                                               dtype=torch.float64),
                    [(mask[:2], gids[:2]), (mask[2:], gids[2:])])
    w = torch.cat(out)
    expected = mask.double() * torch.tensor([1 / 12, 1 / 12, 1 / 12, 1 / 2], dtype=torch.float64)[:, None]
    assert torch.allclose(w, expected)
