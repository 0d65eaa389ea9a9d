"""Layer 3: token_weights over a real gloo process group (torchrun, 2 and 3 ranks) equals the
single-process aggregate, with groups split across ranks and a rank that holds no rows."""

import pathlib

import pytest
import torch

from megatron_rl_agg import LOSS_AGGREGATIONS, aggregate
from tests.distributed.worker_weights import global_batch  # repo root is on pythonpath (pyproject)
from tests.torchrun_utils import load_result

WORKER = pathlib.Path(__file__).with_name("worker_weights.py")


WORLDS = (2, 3)


def worker_jobs(directory):
    """One job in the session's 2- and 3-process launches (``tests/conftest.py``)."""
    return [(world, WORKER, [directory], 240) for world in WORLDS]


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_weights_over_gloo_ranks_equal_aggregate(shared_jobs, world):
    tmp_path = shared_jobs
    values, mask, gids = global_batch()
    sizes = torch.unique_consecutive(gids, return_counts=True)[1].tolist()
    parts = [load_result(tmp_path, f"world{world}_rank{r}") for r in range(world)]
    assert [int(p["rows"][1] - p["rows"][0]) for p in parts].count(0) == (1 if world == 3 else 0)
    for mode in LOSS_AGGREGATIONS:
        if mode == "token_mean_legacy":
            continue
        w = torch.cat([p[mode] for p in parts])
        ref = aggregate(values, mask, mode, group_sizes=sizes, max_response_length=8)
        assert torch.allclose((w * values).sum(), ref, rtol=1e-12), mode
