"""torchrun worker: token_weights over a real gloo process group.

One fixed mini-batch (seeded) is split over the ranks unevenly, with prompt groups straddling the rank
boundaries and (at 3+ ranks) one rank holding no rows at all. Each rank computes the weights of its
rows for every exact mode and saves them; the test reassembles them and compares with aggregate().
Usage: worker_weights.py OUT_DIR
"""

import sys

import torch
import torch.distributed as torch_dist

from megatron_rl_agg import LOSS_AGGREGATIONS, token_weights
from tests.torchrun_utils import save_result



def global_batch():
    gen = torch.Generator().manual_seed(1234)
    n_rows, width = 11, 6
    lengths = torch.tensor([6, 0, 1, 3, 6, 2, 0, 5, 1, 4, 6])        # two fully masked rows
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    values = torch.randn(n_rows, width, generator=gen, dtype=torch.float64)
    group_ids = torch.tensor([10, 10, 10, 11, 11, 11, 11, 12, 12, 13, 13])
    return values, mask, group_ids


def rank_bounds(world: int, n_rows: int):
    # 2 ranks: rows 0-4 | 5-10 (group 11 straddles). 3 ranks: 0-1 | (empty) | 2-10.
    # 4 ranks: 0-2 | 3-4 | 5-7 | 8-10 (groups 11 and 12 straddle).
    cuts = {1: [0, n_rows], 2: [0, 5, n_rows], 3: [0, 2, 2, n_rows], 4: [0, 3, 5, 8, n_rows]}[world]
    return cuts


def run(argv):
    """``argv = [out_dir]`` in a process group that is up (``tests/worker_jobs.py``)."""
    out_dir = argv[0]
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    values, mask, gids = global_batch()
    b = rank_bounds(world, mask.shape[0])
    lo, hi = b[rank], b[rank + 1]
    result = {"rows": torch.tensor([lo, hi])}
    for mode in LOSS_AGGREGATIONS:
        if mode == "token_mean_legacy":
            continue
        result[mode] = token_weights(mask[lo:hi], mode, group_ids=gids[lo:hi], max_response_length=8,
                                     process_group=torch_dist.group.WORLD, dtype=torch.float64)
    save_result(out_dir, f"world{world}_rank{rank}", result)


def main():
    torch_dist.init_process_group("gloo")
    run(sys.argv[1:])
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
