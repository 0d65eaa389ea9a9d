"""torchrun worker: run several trainer invocations (layouts, modes, resumes) in ONE process group.

    torchrun --nproc_per_node N tests/trainer/torchrun_worker.py PLAN.json RESULTS.json

PLAN.json is a list of ``{"name": str, "argv": [trainer flags]}``. Each entry runs
``train.run(parse_args(argv))`` in order (the trainer tears down Megatron's model-parallel state at the
end of every run, so the next entry may use another TP / PP / VPP layout); rank 0 writes
``{name: [metrics of every step]}`` to RESULTS.json. A failing entry aborts the whole launch (a
collective left half-entered on some ranks cannot be recovered from).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/: worker_jobs


def run(argv: list[str]) -> None:
    """``argv = [PLAN.json, RESULTS.json]``; the trainer initialises the process group unless it is up
    (``tests/worker_jobs.py`` runs this in a shared launch)."""
    from megatron_rl_agg.mcore.compat import initialize_distributed
    from megatron_rl_agg.trainer.cli.arguments import parse_args
    from megatron_rl_agg.trainer.loop.train import run as train
    from worker_jobs import freeze_survivors

    plan_path, out_path = argv[0], argv[1]
    with open(plan_path, encoding="utf-8") as fh:
        plan = json.load(fh)
    results = {}
    for entry in plan:
        freeze_survivors()
        results[entry["name"]] = train(parse_args(entry["argv"]))
    rank, _ = initialize_distributed()      # already initialised by the trainer: returns (rank, world)
    if rank == 0:
        with open(out_path, "w", encoding="utf-8") as fh:
            json.dump(results, fh)


def main() -> int:
    run(sys.argv[1:3])
    return 0


if __name__ == "__main__":
    try:
        status = main()
    finally:
        from megatron_rl_agg.mcore.compat import destroy_distributed

        destroy_distributed()
    sys.exit(status)
