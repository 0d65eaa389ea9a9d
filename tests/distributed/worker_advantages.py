"""torchrun worker (gloo, CPU, plain torch.distributed): advantages computed on each rank's share of the
rows, with groups cut by rank boundaries, equal the single-process advantages of the whole batch.

Every rank builds the same global batches from fixed seeds, takes its (uneven) slice of rows, and checks
for many level combinations, leave-one-out and the step policies:

* ``normalize_advantages`` / ``compute_step_advantages`` on the slice with the DP process group equal
  the single-process result on the whole batch (``process_group=None``) to 1e-12 in float64 (relative
  where above 1), and the step statistics are identical;
* every call issues exactly one ``dist.all_gather_fixed`` (one torch.distributed all-gather of one
  fixed-size record per rank: its boundary buckets) and no other collective, whatever the number of
  groups, and the traffic counter reports ``W x 8 x record width`` bytes; with the ids in descending
  order (not ascending over the ranks) the call falls back to the gather of every bucket and still
  matches;
* a batch that is bad on one rank only (non-finite reward, a group id split across non-adjacent ranks)
  raises the same ValueError on every rank instead of leaving ranks behind in a collective.

With 4 processes the cases also run on two 2-rank sub-groups ({0, 2} and {1, 3}, a DP group strided
by a TP size of 2), so ranks in the DP group differ from global ranks.

Usage: ``torchrun --nproc_per_node {2,4} worker_advantages.py`` (prints one ``OK`` line per rank).
"""

from __future__ import annotations

import itertools
import sys
from unittest import mock

import torch
import torch.distributed as torch_dist

from megatron_rl_agg.parallel import dist as agg_dist
from megatron_rl_agg.parallel.advantages import boundary_record_width
from megatron_rl_agg.parallel.advantages import compute_step_advantages, normalize_advantages
from megatron_rl_agg.core.config import AdvantageConfig

TOL = 1e-12
LEVEL_COMBOS = [(m, s, False) for m, s in itertools.product(("group", "batch", "none"), repeat=2)] + [
    ("group", "none", True), ("group", "group", True), ("batch", "none", True), ("batch", "group", True)]


class CollectiveCounter:
    """Counts calls to the plugin's collective wrappers and to the torch.distributed collectives."""

    WRAPPERS = ("all_gather_varlen", "all_gather_fixed", "all_reduce_sum", "all_reduce_max")
    RAW = ("all_gather", "all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter")

    def __init__(self):
        self.counts = {}
        self._patches = []

    def _wrap(self, owner, name, key):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            self.counts[key] = self.counts.get(key, 0) + 1
            return real(*args, **kwargs)

        self._patches.append(mock.patch.object(owner, name, counted))

    def __enter__(self):
        for name in self.WRAPPERS:
            self._wrap(agg_dist, name, name)
        for name in self.RAW:
            self._wrap(torch_dist, name, "torch." + name)
        for p in self._patches:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in reversed(self._patches):
            p.stop()


def make_case(seed, sizes, bounds, *, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    assert bounds[0] == 0 and bounds[-1] == n
    ids = torch.repeat_interleave(torch.arange(len(sizes)) * 3 + 1000, torch.tensor(sizes))
    rewards = torch.randn(n, generator=g, dtype=torch.float64) + offset
    # a few ties so that zero-spread groups occur
    rewards[torch.rand(n, generator=g) < 0.2] = 1.0 + offset
    return dict(rewards=rewards, ids=ids, sizes=sizes, bounds=bounds,
                valid=torch.rand(n, generator=g) < 0.8,
                truncated=torch.rand(n, generator=g) < 0.25,
                sample_valid=torch.rand(n, generator=g) < 0.9)


def cases(world):
    """Hand-made layouts (groups straddling boundaries, an empty rank, a group over three ranks) and
    random ones, all with uneven rows per rank."""
    out = []
    sizes = [4, 4, 3, 1, 5, 2, 6]  # group starts: 0 4 8 11 12 17 19, n = 25
    if world == 2:
        out.append(make_case(1, sizes, [0, 10, 25]))     # group 2 (rows 8-10) straddles 0|1
        out.append(make_case(2, sizes, [0, 0, 25]))      # rank 0 holds nothing
        out.append(make_case(3, sizes, [0, 17, 25]))     # boundary on a group boundary
        out.append(make_case(4, [8] * 3, [0, 13, 24], offset=1e6))
    else:
        out.append(make_case(1, sizes, [0, 10, 14, 18, 25]))  # rank 1 = end of g2 + g3 + start of g4
        out.append(make_case(2, [3, 9, 2, 5], [0, 4, 7, 10, 19]))  # g1 (rows 3-11) on ranks 0, 1, 2
        out.append(make_case(3, sizes, [0, 0, 12, 12, 25]))  # two empty ranks
        out.append(make_case(4, [8] * 3, [0, 5, 6, 20, 24], offset=1e6))
    g = torch.Generator().manual_seed(100 + world)
    for k in range(4):
        sizes = torch.randint(1, 9, (int(torch.randint(5, 60, (1,), generator=g)),), generator=g).tolist()
        n = sum(sizes)
        cuts = sorted(torch.randint(0, n + 1, (world - 1,), generator=g).tolist())
        out.append(make_case(200 + k, sizes, [0] + cuts + [n]))
    return out


def check_close(name, got, want):
    """``|got - want| <= TOL * max(1, |want|)`` element-wise: absolute for advantages of order 1, relative
    for the ones that are not centered (``mean_level="none"`` on rewards offset by 1e6)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(f"{name}: {got.dtype}{list(got.shape)} vs {want.dtype}{list(want.shape)}")
    err = ((got - want).abs() / want.abs().clamp(min=1)).max().item() if want.numel() else 0.0
    if not err <= TOL:
        raise AssertionError(f"{name}: max |distributed - single| / max(1, |single|) = {err:.3e} > {TOL}")
    return err


def run_cases(group, label):
    rank, world = torch_dist.get_rank(group), torch_dist.get_world_size(group)
    worst, checks = 0.0, 0
    gathers_per_call, fallback_calls = set(), set()
    for ci, case in enumerate(cases(world)):
        a, b = case["bounds"][rank], case["bounds"][rank + 1]
        share = {k: case[k][a:b] for k in ("rewards", "ids", "valid", "truncated", "sample_valid")}
        for mean_level, std_level, loo in LEVEL_COMBOS:
            for unbiased in (True, False):
                kw = dict(valid=case["valid"], mean_level=mean_level, std_level=std_level, leave_one_out=loo,
                          unbiased=unbiased)
                want = normalize_advantages(case["rewards"], group_sizes=case["sizes"], **kw)[a:b]
                kw["valid"] = share["valid"]
                with CollectiveCounter() as counter, agg_dist.count_collectives() as traffic:
                    got = normalize_advantages(share["rewards"], group_ids=share["ids"], process_group=group,
                                               **kw)
                gathers_per_call.add(tuple(sorted(counter.counts.items())))
                width = boundary_record_width(batch_level="batch" in (mean_level, std_level),
                                              expected_group_size_known=False)
                if traffic.bytes != {"all_gather_fixed": world * 8 * width}:
                    raise AssertionError(f"{label} case {ci}: traffic {traffic.bytes}, expected "
                                         f"{world} x 8 x {width} bytes")
                if mean_level == std_level == "group" and not loo:
                    # descending ids: the full gather of every bucket, the same advantages
                    with CollectiveCounter() as counter:
                        back = normalize_advantages(share["rewards"], group_ids=-share["ids"],
                                                    process_group=group, **kw)
                    fallback_calls.add(tuple(sorted(counter.counts.items())))
                    check_close(f"{label} case {ci} descending ids", back, got)
                worst = max(worst, check_close(f"{label} case {ci} {mean_level}/{std_level} loo={loo} "
                                               f"unbiased={unbiased}", got, want))
                checks += 1
        for est, policy, min_valid in itertools.product(("grpo", "rloo", "dr_grpo"),
                                                        ("keep", "zero_advantage", "mask"), (1, 3)):
            cfg = AdvantageConfig(adv_estimator=est, overlong_policy=policy, min_valid_group_size=min_valid)
            want = compute_step_advantages(case["rewards"], case["ids"], truncated=case["truncated"],
                                           sample_valid=case["sample_valid"], cfg=cfg, expected_group_size=8)
            with CollectiveCounter() as counter:
                got = compute_step_advantages(share["rewards"], share["ids"], truncated=share["truncated"],
                                              sample_valid=share["sample_valid"], cfg=cfg,
                                              process_group=group, expected_group_size=8)
            gathers_per_call.add(tuple(sorted(counter.counts.items())))
            name = f"{label} case {ci} {est}/{policy}/{min_valid}"
            worst = max(worst, check_close(name, got[0], want[0][a:b]))
            if not torch.equal(got[1], want[1][a:b]):
                raise AssertionError(f"{label} case {ci} {est}/{policy}: loss_row_mask differs")
            if got[2] != want[2]:
                raise AssertionError(f"{label} case {ci} {est}/{policy}: stats {got[2]} != {want[2]}")
            checks += 1
    # the same collectives for every call, whatever the number of groups: one fixed-size all-gather
    expected = (("all_gather_fixed", 1), ("torch.all_gather", 1))
    if gathers_per_call != {expected}:
        raise AssertionError(f"{label}: collectives per call {gathers_per_call}, expected {expected}")
    # descending ids: the boundary records, then the varlen gather (row counts, then rows)
    expected = (("all_gather_fixed", 1), ("all_gather_varlen", 1), ("torch.all_gather", 3))
    if fallback_calls != {expected}:
        raise AssertionError(f"{label}: fallback collectives {fallback_calls}, expected {expected}")
    return worst, checks


def check_errors_everywhere(group, label):
    """A defect on one rank raises the same error on every rank (all ranks pass the same gather)."""
    rank, world = torch_dist.get_rank(group), torch_dist.get_world_size(group)
    rewards = torch.arange(3, dtype=torch.float64) + rank
    # rank 0 ends with id 7, rank 1 starts with id 9 and ends with id 7 again: not contiguous
    ids = {0: [5, 7, 7], 1: [9, 9, 7]}.get(rank, [20 + rank] * 3)
    messages = []
    try:
        normalize_advantages(rewards, group_ids=torch.tensor(ids), process_group=group)
    except ValueError as err:
        messages.append(str(err))
    if len(messages) != 1 or "[7]" not in messages[0] or "rank(s) [0, 1]" not in messages[0]:
        raise AssertionError(f"{label}: rank {rank} non-contiguous ids gave {messages}")
    bad = rewards.clone()
    if rank == world - 1:
        bad[1] = float("nan")
    try:
        normalize_advantages(bad, group_ids=torch.full((3,), rank), process_group=group)
        raise AssertionError(f"{label}: rank {rank} did not raise for a NaN on rank {world - 1}")
    except ValueError as err:
        text = str(err)
        if f"rank(s) [{world - 1}]" not in text or ((rank == world - 1) != ("rows [1]" in text)):
            raise AssertionError(f"{label}: rank {rank} NaN message: {text}") from None
    # and the group is still in step: a normal call afterwards succeeds on every rank
    normalize_advantages(rewards, group_ids=torch.full((3,), rank), process_group=group)


def run(argv=()):
    """The checks in a process group that is up (``tests/worker_jobs.py``); ``argv = [out_dir]`` saves
    each rank's summary there as well as printing its ``OK`` line."""
    world = torch_dist.get_world_size()
    groups = [("world", torch_dist.group.WORLD)]
    if world == 4:
        subgroups = [torch_dist.new_group([0, 2]), torch_dist.new_group([1, 3])]
        groups.append(("dp{0,2}|{1,3}", subgroups[torch_dist.get_rank() % 2]))
    worst, checks = 0.0, 0
    for label, group in groups:
        w, c = run_cases(group, label)
        check_errors_everywhere(group, label)
        worst, checks = max(worst, w), checks + c
    torch_dist.barrier()
    print(f"OK rank {torch_dist.get_rank()}/{world}: {checks} comparisons, max |diff| {worst:.3e}",
          flush=True)
    if argv:
        from tests.torchrun_utils import save_result

        save_result(argv[0], f"world{world}_rank{torch_dist.get_rank()}",
                    {"world": world, "comparisons": checks, "worst": worst})


def main():
    torch_dist.init_process_group("gloo")
    run(sys.argv[1:])
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
