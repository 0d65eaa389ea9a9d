"""Advantage normalization across real DP ranks: torchrun (gloo, CPU, no Megatron) with 2 and 4
processes, uneven rows per rank and groups cut by rank boundaries, must reproduce the single-process
advantages and step statistics, with a constant number of collectives per call. The checks live in
``worker_advantages.py``; each rank prints one ``OK`` line when all of them passed."""

from __future__ import annotations

import pathlib
import re
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from torchrun_utils import run_torchrun  # noqa: E402

pytestmark = pytest.mark.slow

WORKER = pathlib.Path(__file__).with_name("worker_advantages.py")
# not anchored: the ranks share one stdout pipe, so their lines may come interleaved
OK = re.compile(r"OK rank (\d+)/(\d+): (\d+) comparisons, max \|diff\| (\d\.\d{3}e[+-]\d+)")


@pytest.mark.parametrize("nproc", [2, 4])
def test_distributed_advantages_equal_single_process(nproc):
    out = run_torchrun(WORKER, nproc, timeout=300)
    lines = OK.findall(out)
    assert sorted(int(r) for r, *_ in lines) == list(range(nproc)), out[-3000:]
    for _, world, comparisons, worst in lines:
        assert int(world) == nproc
        # 8 layouts x (13 level combinations x 2 std flavours + 18 policy settings), once per process
        # group the worker uses (the world, plus a strided 2-rank DP group at 4 processes)
        assert int(comparisons) == 8 * (13 * 2 + 18) * (2 if nproc == 4 else 1)
        assert float(worst) <= 1e-12
