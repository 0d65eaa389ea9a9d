"""Bytes and calls per optimizer step of the group statistics: advantages plus ``prompt_mean`` weights.

Runs under torchrun (plain torch.distributed, gloo on CPU; no Megatron). Every rank holds ``G`` prompt
groups' worth of rows (``n`` samples per prompt), shifted by half a group per rank so that every rank
boundary cuts a group, and calls, as the trainer does once per step:

* ``compute_step_advantages`` (GRPO, ``expected_group_size=n``; and the batch-level variant
  ``--levels batch``: group mean / batch std, no expected size);
* ``token_weights(loss_mask, "prompt_mean", group_ids=...)``.

``megatron_rl_agg.parallel.dist.count_collectives`` records the calls and the payload (bytes of each collective's
result on this rank). Two id orders: ``ascending`` (the trainer's prompt indices: the boundary exchange)
and ``descending`` (the same groups, ids reversed: the gather of every bucket, i.e. the traffic before
the boundary exchange). The analytic payloads it prints next to the measured ones (W ranks, S buckets
on the fullest rank = G + 1 when the boundaries cut groups):

* boundary exchange: advantages ``8 W (17 + p + 4 b)`` (``p`` = 1 with an expected group size, else 2;
  ``b`` = 1 when a level is ``batch``); weights ``8 W * 6 + 16`` (the 48-byte records and the
  ``[N_tok, N_live]`` all-reduce);
* full gather: advantages ``8 W (17 + p + 4 b) + 8 W + 80 W S``; weights ``8 W * 6 + 8 W + 16 W S + 16``.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 8 benchmarks/bench_group_traffic.py \
        --groups-per-rank 64 [--json traffic.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as torch_dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rl_agg.parallel import dist  # noqa: E402
from megatron_rl_agg.parallel.advantages import boundary_record_width  # noqa: E402
from megatron_rl_agg.parallel.advantages import compute_step_advantages
from megatron_rl_agg.parallel.weights import token_weights  # noqa: E402
from megatron_rl_agg.core.config import AdvantageConfig  # noqa: E402


def formula(world: int, buckets: int, *, batch_level: bool, expected: bool, boundary: bool) -> dict:
    width = boundary_record_width(batch_level=batch_level, expected_group_size_known=expected)
    adv = 8 * world * width
    weights = 8 * world * 6 + 16
    if not boundary:
        adv += 8 * world + 80 * world * buckets
        weights += 8 * world + 16 * world * buckets
    return {"advantages": adv, "weights": weights, "total": adv + weights}


def measure(rank: int, world: int, groups: int, n: int, seq: int, *, descending: bool, batch_level: bool):
    rows_per_rank = groups * n
    # every rank boundary falls half-way into a group (G + 1 buckets on all ranks but the last)
    lo = rank * rows_per_rank + (n // 2 if rank > 0 else 0)
    hi = (rank + 1) * rows_per_rank + (n // 2 if rank < world - 1 else 0)
    g = torch.Generator().manual_seed(rank)
    gids = torch.arange(lo, hi) // n
    if descending:
        gids = 10 ** 9 - gids
    rewards = torch.randint(0, 2, (hi - lo,), generator=g).double()
    mask = (torch.rand(hi - lo, seq, generator=g) < 0.7).long()
    cfg = AdvantageConfig(adv_estimator="grpo", std_level="batch" if batch_level else "group")
    expected = None if batch_level else n
    with dist.count_collectives() as adv:
        compute_step_advantages(rewards, gids, truncated=None, cfg=cfg, process_group=torch_dist.group.WORLD,
                                expected_group_size=expected)
    with dist.count_collectives() as w:
        token_weights(mask, "prompt_mean", group_ids=gids, process_group=torch_dist.group.WORLD)
    buckets = torch.unique_consecutive(gids).numel()
    return adv, w, buckets


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups-per-rank", type=int, default=64)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch_dist.init_process_group("gloo")
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    rows = []
    for batch_level in (False, True):
        for descending in (False, True):
            adv, w, buckets = measure(rank, world, args.groups_per_rank, args.samples_per_prompt, args.seq,
                                      descending=descending, batch_level=batch_level)
            fullest = torch.tensor([buckets])
            torch_dist.all_reduce(fullest, op=torch_dist.ReduceOp.MAX)
            want = formula(world, int(fullest), batch_level=batch_level, expected=not batch_level,
                           boundary=not descending)
            rows.append({"ranks": world, "groups_per_rank": args.groups_per_rank,
                         "levels": "group/batch" if batch_level else "group/group",
                         "exchange": "full gather" if descending else "boundary",
                         "adv_bytes": adv.total_bytes, "adv_calls": adv.total_calls,
                         "weights_bytes": w.total_bytes, "weights_calls": w.total_calls,
                         "total_bytes": adv.total_bytes + w.total_bytes, "formula_bytes": want["total"],
                         "formula_match": adv.total_bytes == want["advantages"]
                         and w.total_bytes == want["weights"]})
    if rank == 0:
        print(f"{'ranks':>5} {'G/rank':>6} {'levels':>11} {'exchange':>11} {'adv B':>9} {'calls':>5} "
              f"{'weights B':>9} {'calls':>5} {'total B':>9} {'formula':>9}")
        for r in rows:
            print(f"{r['ranks']:>5} {r['groups_per_rank']:>6} {r['levels']:>11} {r['exchange']:>11} "
                  f"{r['adv_bytes']:>9} {r['adv_calls']:>5} {r['weights_bytes']:>9} {r['weights_calls']:>5} "
                  f"{r['total_bytes']:>9} {r['formula_bytes']:>9}{'' if r['formula_match'] else ' MISMATCH'}")
        at_scale = {f"{lv}/{ex}": formula(4096, 65, batch_level=lv == "batch", expected=lv != "batch",
                                          boundary=ex == "boundary")["total"]
                    for lv in ("group", "batch") for ex in ("boundary", "full gather")}
        print("formula at 4096 ranks x 64 groups per rank (65 buckets on a rank):",
              ", ".join(f"{k} {v:,} B" for k, v in at_scale.items()))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "at_4096x64": at_scale}, f, indent=1)
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
