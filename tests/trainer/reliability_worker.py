"""torchrun worker of the reliability tests: trainer runs that are expected to fail, in one process group.

    torchrun --nproc_per_node N tests/trainer/reliability_worker.py PLAN.json OUT_DIR

PLAN.json is a list of ``{"name", "argv", "ops": [...], "digest": DIR}``. Before an entry rank 0 applies
its file operations (``{"op": "copy", "src", "dst"}``, ``{"op": "truncate", "path", "bytes"}``) and every
rank waits for it; then ``train.run(parse_args(argv))`` runs. An error the trainer raises on purpose (bad
checkpoint, non-finite update: the same on every rank, before or between collectives) is recorded and the
next entry runs. With ``digest`` rank 0 records ``{file: sha256}`` of that directory before and after.
Every rank writes ``OUT_DIR/rank<r>.json`` (``{name: {"history": [...]} or {"error", "message"}}``) and
``OUT_DIR/pid<r>`` (its process id, for the tests that stop or kill a rank). The exit status is 1 when
the last entry raised, so torchrun ends the launch.
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/: worker_jobs


def _digest(root: str) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _apply(ops: list) -> None:
    for op in ops:
        if op["op"] == "copy":
            shutil.copytree(op["src"], op["dst"])
        elif op["op"] == "truncate":
            with open(op["path"], "r+b") as fh:
                fh.truncate(op["bytes"])
        else:
            raise ValueError(f"unknown op {op!r}")


def main() -> int:
    from megatron_rl_agg.mcore.compat import quiet_warnings

    quiet_warnings()
    import torch.distributed as torch_dist

    from megatron_rl_agg.trainer.cli.arguments import parse_args
    from megatron_rl_agg.trainer.loop.train import run
    from megatron_rl_agg.core import policy_losses
    from worker_jobs import freeze_survivors

    plan_path, out_dir = sys.argv[1], sys.argv[2]
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"pid{rank}"), "w") as fh:
        fh.write(str(os.getpid()))
    with open(plan_path, encoding="utf-8") as fh:
        plan = json.load(fh)
    results, failed = {}, False
    for entry in plan:
        freeze_survivors()
        if entry.get("ops"):
            if rank == 0:
                _apply(entry["ops"])
            torch_dist.barrier()            # the group exists: an earlier entry created it
        before = _digest(entry["digest"]) if entry.get("digest") and rank == 0 else None
        bound = policy_losses.LOG_RATIO_BOUND
        # "log_ratio_bound": lift the loss's clamp of log r for this entry (a stack without the clamp), so a
        # far-off behaviour log-prob overflows the ratio and the non-finite guard has something to catch.
        policy_losses.LOG_RATIO_BOUND = entry.get("log_ratio_bound", bound)
        try:
            results[entry["name"]] = {"history": run(parse_args(entry["argv"]))}
            failed = False
        except (ValueError, RuntimeError) as err:
            results[entry["name"]] = {"error": type(err).__name__, "message": str(err)}
            print(f"[rank {rank}] {entry['name']}: {type(err).__name__}: {err}", flush=True)
            failed = True
        finally:
            policy_losses.LOG_RATIO_BOUND = bound
        if before is not None:
            results[entry["name"]].update(before=before, after=_digest(entry["digest"]))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
            json.dump(results, fh)
    return 1 if failed else 0


if __name__ == "__main__":
    status = main()
    if status:
        # The last entry failed: a peer may be stopped or gone, so tearing the groups down could wait on
        # it; leave at once (as scripts/train_grpo.py does after a timeout).
        sys.stdout.flush()
        os._exit(status)
    from megatron_rl_agg.mcore.compat import destroy_distributed

    destroy_distributed()
    sys.exit(status)
