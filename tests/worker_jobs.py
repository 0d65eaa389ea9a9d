"""torchrun worker: run the jobs of several worker scripts in ONE launch (one process group).

    torchrun --nproc_per_node N tests/worker_jobs.py JOBS.json

JOBS.json is a list of ``{"script": path, "argv": [str]}``. Each script is a worker of its own (it keeps
its ``main`` for a standalone launch) that also defines ``run(argv)``: the work of ``main`` in a process
group that is already up, with its model-parallel state destroyed on return. This process initialises
the default group once, runs every job in order (a job that raises ends the launch: a collective left
half-entered on some ranks cannot be recovered from), and destroys the group at the end.

Start-up dominates a CPU launch (importing torch and Megatron-Core takes ~6-9 s per process), so the
multi-process tests collect their jobs into one launch per process count (``tests/conftest.py``).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def _load(script: str):
    path = pathlib.Path(script)
    spec = importlib.util.spec_from_file_location(f"_job_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    spec.loader.exec_module(module)
    return module


def freeze_survivors() -> None:
    """Collect, then freeze what survives (imports, the process group): call it between jobs.

    Each layout teardown runs a full garbage collection (``compat.destroy_model_parallel``: a
    dropped Megatron model holds its gloo groups' threads until the cycle collector frees it). With torch,
    Megatron and transformers imported a full collection scans ~430k objects (~0.5 s); frozen, it scans
    only what the current job allocated (a few ms). Between jobs nothing of a job is alive, so nothing
    the collector should free is frozen.
    """
    gc.collect()
    gc.freeze()


def main(jobs_file: str) -> None:
    import torch.distributed as torch_dist

    from megatron_rl_agg.mcore import compat

    jobs = json.loads(pathlib.Path(jobs_file).read_text())
    compat.initialize_distributed()
    modules = {}
    for job in jobs:
        if job["script"] not in modules:
            modules[job["script"]] = _load(job["script"])
    for job in jobs:
        freeze_survivors()
        start = time.perf_counter()
        modules[job["script"]].run(job["argv"])
        torch_dist.barrier()
        if torch_dist.get_rank() == 0:
            print(f"[worker_jobs] {pathlib.Path(job['script']).name} {' '.join(job['argv'][1:])[:120]}: "
                  f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    finally:
        from megatron_rl_agg.mcore.compat import destroy_distributed

        destroy_distributed()
