"""torchrun worker: ``dist.barrier`` (checkpoints and exports) waits for every rank, CP peers included.

    torchrun --nproc_per_node 2 tests/trainer/barrier_worker.py OUT_DIR

At CP2 on two processes the data-parallel group and the model-parallel group are single ranks each, so
a barrier chained over those two groups returns at once. Here rank 1 arrives late (it sleeps, then writes
its marker); after ``dist.barrier`` each rank lists the markers it sees into ``OUT_DIR/seen_<rank>.json``
(``tests/trainer/test_trainer_checkpoint.py`` asserts that both saw both).
"""

import json
import sys
import time
from pathlib import Path


def run(argv: list[str]) -> None:
    """``argv = [OUT_DIR]``; the process group is up (``tests/worker_jobs.py``)."""
    from megatron_rl_agg.mcore import compat, cpu_mode
    from megatron_rl_agg.parallel import dist

    out = Path(argv[0])
    rank, world = compat.initialize_distributed()
    compat.initialize_model_parallel(1, 1, None, cp=world)
    try:
        if rank > 0:
            time.sleep(2.0)
        (out / f"arrived_{rank}").write_text("1")
        dist.barrier(cpu_mode.device())
        seen = sorted(p.name for p in out.glob("arrived_*"))
        (out / f"seen_{rank}.json").write_text(json.dumps(seen))
    finally:
        compat.destroy_model_parallel()


if __name__ == "__main__":
    try:
        run(sys.argv[1:2])
    finally:
        from megatron_rl_agg.mcore.compat import destroy_distributed

        destroy_distributed()
