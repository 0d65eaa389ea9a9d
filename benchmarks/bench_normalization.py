"""Throughput of group advantage normalization: the vectorized segment reductions of
``megatron_rl_agg.parallel.advantages.normalize_advantages`` against its floor and against per-group loops.

    OMP_NUM_THREADS=1 python benchmarks/bench_normalization.py          # 1,000,000 rows, 250,000 groups
    OMP_NUM_THREADS=1 python benchmarks/bench_normalization.py --loop-groups 0   # loops over every group

The batch has ``--groups`` groups of random (partial) sizes >= 1 that sum to ``--rows``: each group gets one
row, the remaining rows fall into uniformly drawn groups (sizes ~ 1 + Poisson(rows/groups - 1)), and ~10%
of the rows are invalid. Both implementations compute GRPO advantages (group mean, unbiased group std,
eps 1e-6, < 2 valid rows -> 0).

The floor is the least work that computes the same GRPO advantages: one float64 ``index_add_`` pass
each for the valid count, the sum and the sum of squares, then ``(r - mean) / (std + eps)`` per row, with
no validity checks, no truncation policy, no shift against cancellation and no cross-rank buckets
(``floor_index_add``). The output gives the ratio ``normalize_advantages / floor`` (medians of
``--repeats`` warm calls, both in the same run, so machine load affects both alike).

The loop baselines are what a straightforward implementation does: slice each group and reduce it, once
with torch ops per group and once with Python floats. They are slow, so by default they run on the first
``--loop-groups`` groups only and the time is extrapolated linearly to all groups (the per-group cost does
not depend on the number of groups); the output says so. Their results are checked against the vectorized
ones on the rows they cover.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from megatron_rl_agg.parallel.advantages import normalize_advantages


def make_batch(rows: int, groups: int, seed: int, device: str):
    if not 1 <= groups <= rows:
        raise ValueError(f"need 1 <= groups <= rows, got groups={groups}, rows={rows}")
    g = torch.Generator().manual_seed(seed)
    extra = torch.randint(0, groups, (rows - groups,), generator=g)
    sizes = 1 + torch.bincount(extra, minlength=groups)
    rewards = torch.randn(rows, generator=g, dtype=torch.float64)
    valid = torch.rand(rows, generator=g) >= 0.1
    return sizes, rewards.to(device), valid.to(device)


def floor_index_add(rewards, valid, ids, groups, eps=1e-6):
    """GRPO advantages from three float64 index_add_ segment sums (count, sum, sum of squares)."""
    v = valid.to(torch.float64)
    r = torch.where(valid, rewards, 0.0)
    cnt = torch.zeros(groups, dtype=torch.float64, device=r.device).index_add_(0, ids, v)
    total = torch.zeros(groups, dtype=torch.float64, device=r.device).index_add_(0, ids, r)
    squares = torch.zeros(groups, dtype=torch.float64, device=r.device).index_add_(0, ids, r * r)
    mean = total / cnt.clamp(min=1)
    std = ((squares - cnt * mean * mean) / (cnt - 1).clamp(min=1)).clamp(min=0).sqrt()
    scale = torch.where((cnt >= 2) & (std > 0), 1.0 / (std + eps), 0.0)
    return torch.where(valid, (rewards - mean[ids]) * scale[ids], 0.0)


def loop_torch(rewards, valid, sizes, eps=1e-6):
    """One group at a time with torch reductions (the shape of most framework code)."""
    out = torch.zeros_like(rewards)
    start = 0
    for size in sizes.tolist():
        r, v = rewards[start:start + size], valid[start:start + size]
        x = r[v]
        if x.numel() >= 2:
            std = x.std()
            if std > 0:
                out[start:start + size] = torch.where(v, (r - x.mean()) / (std + eps), 0.0)
        start += size
    return out


def loop_python(rewards, valid, sizes, eps=1e-6):
    """One group at a time on Python floats (no per-op tensor overhead)."""
    r_all, v_all = rewards.tolist(), valid.tolist()
    out = [0.0] * len(r_all)
    start = 0
    for size in sizes.tolist():
        idx = [i for i in range(start, start + size) if v_all[i]]
        if len(idx) >= 2:
            xs = [r_all[i] for i in idx]
            mean = math.fsum(xs) / len(xs)
            std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
            if std > 0:
                for i in idx:
                    out[i] = (r_all[i] - mean) / (std + eps)
        start += size
    return torch.tensor(out, dtype=rewards.dtype, device=rewards.device)


def timed(fn, repeats, sync, warm=True):
    """Median of ``repeats`` wall times (after one untimed warm-up call when ``warm``)."""
    if warm:
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--groups", type=int, default=250_000)
    ap.add_argument("--loop-groups", type=int, default=25_000,
                    help="groups the loops run on (time extrapolated to all groups); 0 = all groups")
    ap.add_argument("--repeats", type=int, default=9, help="repeats of the vectorized version and the floor "
                    "(median)")
    ap.add_argument("--loop-repeats", type=int, default=3, help="repeats of each loop (median)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    sizes, rewards, valid = make_batch(args.rows, args.groups, args.seed, args.device)
    ids = torch.repeat_interleave(torch.arange(args.groups, device=args.device), sizes.to(args.device))
    print(f"batch: {args.rows:,} rows, {args.groups:,} groups (sizes {int(sizes.min())}..{int(sizes.max())}, "
          f"mean {args.rows / args.groups:.2f}), {int((~valid).sum()):,} invalid rows, device {args.device}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")

    t_ids, adv = timed(lambda: normalize_advantages(rewards, group_ids=ids, valid=valid), args.repeats, sync)
    t_sizes, adv2 = timed(lambda: normalize_advantages(rewards, group_sizes=sizes, valid=valid),
                          args.repeats, sync)
    assert torch.equal(adv, adv2)
    t_floor, adv_floor = timed(lambda: floor_index_add(rewards, valid, ids, args.groups), args.repeats, sync)
    # the floor's one-pass variance (sum of squares - n mean^2) cancels digits in tight groups
    floor_err = (adv_floor - adv).abs().max().item()
    assert floor_err < 1e-4, f"the floor disagrees with normalize_advantages by {floor_err}"

    n_loop = args.groups if args.loop_groups <= 0 else min(args.loop_groups, args.groups)
    rows_loop = int(sizes[:n_loop].sum())
    scale = args.groups / n_loop
    note = "measured on all groups" if n_loop == args.groups else \
        f"measured on {n_loop:,} groups ({rows_loop:,} rows), extrapolated x{scale:g}"
    results = {}
    for name, fn in (("loop_torch", loop_torch), ("loop_python", loop_python)):
        t, out = timed(lambda: fn(rewards[:rows_loop], valid[:rows_loop], sizes[:n_loop]), args.loop_repeats,
                       sync, warm=False)
        # the loop only sees its groups; their advantages depend on nothing else
        err = (out - adv[:rows_loop]).abs().max().item()
        assert err < 1e-9, f"{name} disagrees with the vectorized result by {err}"
        results[name] = t * scale

    print(f"vectorized (group_ids):   {t_ids * 1e3:9.1f} ms  ({args.rows / t_ids / 1e6:.2f} M rows/s, "
          f"median of {args.repeats})")
    print(f"vectorized (group_sizes): {t_sizes * 1e3:9.1f} ms")
    print(f"floor (3 x index_add_):   {t_floor * 1e3:9.1f} ms  -> normalize_advantages / floor = "
          f"{t_ids / t_floor:.2f}x (group_ids), {t_sizes / t_floor:.2f}x (group_sizes); "
          f"max |floor - vectorized| {floor_err:.1e}")
    if hasattr(os, "getloadavg"):
        print(f"load average (1 min) during the run: {os.getloadavg()[0]:.1f}")
    for name, t in results.items():
        print(f"{name + ':':<25} {t * 1e3:9.1f} ms  ({note}, median of {args.loop_repeats}); "
              f"vectorized (group_ids) is {t / t_ids:,.0f}x faster")


if __name__ == "__main__":
    main()
