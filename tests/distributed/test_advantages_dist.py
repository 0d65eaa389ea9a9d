"""Advantage normalization across real DP ranks: torchrun (gloo, CPU, no Megatron) with 2 and 4
processes, uneven rows per rank and groups cut by rank boundaries, must reproduce the single-process
advantages and step statistics, with a constant number of collectives per call. The checks live in
``worker_advantages.py``; each rank saves its summary (and prints one ``OK`` line) when all of them
passed, as jobs of the session's shared launches."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from torchrun_utils import load_result  # noqa: E402

pytestmark = pytest.mark.slow

WORKER = pathlib.Path(__file__).with_name("worker_advantages.py")


NPROCS = (2, 4)


def worker_jobs(directory):
    """One job in each of the session's 2- and 4-process launches (``tests/conftest.py``)."""
    return [(nproc, WORKER, [directory], 300) for nproc in NPROCS]


@pytest.mark.parametrize("nproc", NPROCS)
def test_distributed_advantages_equal_single_process(shared_jobs, nproc):
    lines = [load_result(shared_jobs, f"world{nproc}_rank{rank}") for rank in range(nproc)]
    for line in lines:
        world, comparisons, worst = line["world"], line["comparisons"], line["worst"]
        assert int(world) == nproc
        # 8 layouts x (13 level combinations x 2 std flavours + 18 policy settings), once per process
        # group the worker uses (the world, plus a strided 2-rank DP group at 4 processes)
        assert int(comparisons) == 8 * (13 * 2 + 18) * (2 if nproc == 4 else 1)
        assert float(worst) <= 1e-12
