"""torchrun worker: what a layout teardown releases (process groups, their threads and sockets).

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/megatron/worker_teardown.py OUT_DIR

Counts, on every rank, the process groups torch.distributed holds, the process's threads and its open
file descriptors: before any layout (the baseline), then after each of these teardowns:

* ``dropped``: 3 cycles of ``initialize_model_parallel(tp=2)``, ``build_model`` (Megatron DDP), the
  model dropped, ``compat.destroy_model_parallel()``;
* ``kept``: 4 cycles where the model is still referenced at teardown (a worker looping over layouts)
  and dropped when the next cycle replaces it;
* ``megatron``: a cycle torn down by Megatron's own ``parallel_state.destroy_model_parallel()`` (the
  control: its groups stay registered), then by ``compat.destroy_model_parallel()``.

Rank 0 saves ``OUT_DIR/teardown.pt`` with every rank's counts (tests/megatron/test_teardown.py).
"""

from __future__ import annotations

import os
import pathlib
import sys

import torch.distributed as torch_dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from torchrun_utils import save_result  # noqa: E402

from megatron_rl_agg.mcore import compat  # noqa: E402
from megatron_rl_agg.mcore.build import build_model  # noqa: E402
from megatron_rl_agg.mcore.spec import GPTSpec  # noqa: E402

SPEC = GPTSpec(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, max_seq_length=12,
               ffn_hidden_size=64)


def counts() -> dict:
    return {"groups": len(torch_dist.distributed_c10d._world.pg_map),
            "threads": len(os.listdir("/proc/self/task")), "fds": len(os.listdir("/proc/self/fd"))}


def run(argv: list[str]) -> None:
    """``argv = [out_dir]`` in a process group that is up (``tests/worker_jobs.py``)."""
    from megatron.core import parallel_state

    out = {"baseline": counts(), "dropped": [], "kept": [], "megatron": {}}
    for _ in range(3):
        compat.initialize_model_parallel(tp=2)
        chunks = build_model(SPEC)
        del chunks
        compat.destroy_model_parallel()
        out["dropped"].append(counts())
    chunks = None
    for _ in range(4):
        compat.initialize_model_parallel(tp=2)
        chunks = build_model(SPEC)
        out["during"] = counts()
        compat.destroy_model_parallel()
        out["kept"].append(counts())
    del chunks
    compat.initialize_model_parallel(tp=2)
    chunks = build_model(SPEC)
    del chunks
    parallel_state.destroy_model_parallel()
    out["megatron"]["own"] = counts()
    compat.destroy_model_parallel()
    out["megatron"]["then_ours"] = counts()
    gathered = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, out)
    if torch_dist.get_rank() == 0:
        save_result(argv[0], "teardown", {"ranks": gathered})


def main(out_dir: str) -> None:
    compat.initialize_distributed()
    try:
        run([out_dir])
    finally:
        compat.destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
