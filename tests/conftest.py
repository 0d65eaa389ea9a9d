"""Shared settings of the test suite, and one torchrun launch per process count for the whole session.

A test module that needs multi-process runs defines ``worker_jobs(directory) -> [(nproc, worker script,
argv, seconds)]`` (``seconds``: that job's share of the launch's time limit; ``directory`` is the
module's own result directory, where ``worker_jobs`` may also write the inputs the jobs read) and takes
the ``shared_jobs`` fixture, which returns that directory once the jobs have run. Each worker script
defines ``run(argv)`` (``tests/worker_jobs.py``). The first test that needs the fixture runs the jobs of
every module whose selected tests need it, grouped by process count, in module order: a CPU launch
costs ~6-9 s of imports per process, so the suite's dozen multi-process modules share four launches
(1, 2, 3 and 4 processes; the fault tests of ``tests/trainer/test_reliability_dist.py``, the audit, the
docs and the demo launch their own).
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import pytest

# Multi-process tests launch torchrun; keep every process single-threaded on small CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from torchrun_utils import run_jobs  # noqa: E402
from worker_jobs import freeze_survivors  # noqa: E402


def pytest_collection_finish(session):
    # Every test module is imported: freeze what survives, so that the full collection of each layout
    # teardown in this process scans only what the tests allocate (worker_jobs.freeze_survivors).
    freeze_survivors()


@pytest.fixture(scope="session")
def _shared_job_dirs(request, tmp_path_factory):
    modules = []
    for item in request.session.items:
        module = getattr(item, "module", None)
        if "shared_jobs" in getattr(item, "fixturenames", ()) and module not in modules:
            modules.append(module)
    dirs, launches = {}, {}
    for module in modules:
        directory = tmp_path_factory.mktemp(module.__name__.rpartition(".")[2])
        dirs[module.__name__] = directory
        for nproc, script, argv, seconds in module.worker_jobs(directory):
            launch = launches.setdefault(nproc, {"jobs": [], "seconds": 60})
            launch["jobs"].append((script, argv))
            launch["seconds"] += seconds
    jobs_dir = tmp_path_factory.mktemp("shared_jobs")
    for nproc in sorted(launches):
        start = time.perf_counter()
        stdout = run_jobs(nproc, launches[nproc]["jobs"], jobs_dir / f"jobs_{nproc}.json",
                          timeout=launches[nproc]["seconds"])
        print(f"\n[shared_jobs] nproc={nproc}: {time.perf_counter() - start:.1f} s wall\n{stdout}")
    return dirs


@pytest.fixture(scope="module")
def shared_jobs(request, _shared_job_dirs):
    """This module's result directory, after the session's shared launches ran its ``worker_jobs``."""
    return _shared_job_dirs[request.module.__name__]
