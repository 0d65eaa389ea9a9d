"""Shared pieces of the trainer tests: synthetic rollout files, and trainer plans as jobs of the session's
shared torchrun launches (``tests/conftest.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "trainer" / "torchrun_worker.py"

# A tiny model every launch can build at TP2 / PP2 / PP2 x VPP2 (4 layers = 2 stages x 2 virtual stages).
MODEL_ARGS = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
              "--vocab-size", "32", "--no-progress-bar", "--seed", "7"]


def write_rollouts(path: Path, group_sizes, *, seed: int, truncated_groups=(), with_logprobs=False) -> list:
    """A JSONL rollout file with the given consecutive group sizes; returns the rows as dicts.

    Prompts of 2-4 tokens, responses of 1-7 tokens ("stop") or exactly 8 ("length", truncated); every
    row of the groups in ``truncated_groups`` is truncated, other rows are truncated with probability
    1/4. Rewards are distinct, so no group has zero spread by accident.
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for gid, size in enumerate(group_sizes):
        prompt = torch.randint(0, 32, (int(torch.randint(2, 5, (), generator=g)),), generator=g).tolist()
        for _ in range(size):
            trunc = gid in truncated_groups or bool(torch.rand((), generator=g) < 0.25)
            length = 8 if trunc else int(torch.randint(1, 8, (), generator=g))
            row = {"prompt_id": f"p{gid}", "prompt": prompt,
                   "response": torch.randint(0, 32, (length,), generator=g).tolist(),
                   "reward": round(float(torch.rand((), generator=g)) * 2 - 0.5, 4),
                   "finish_reason": "length" if trunc else "stop"}
            if with_logprobs:
                row["logprobs"] = [round(-float(x), 4) for x in torch.rand(length, generator=g) * 4 + 2.5]
            rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def trainer_job(plan: list, nproc: int, directory: Path, seconds: int = 600) -> tuple:
    """``plan`` (``[{"name", "argv"}]``) as a job of the session's shared launches (``tests/conftest.py``):
    writes the plan into ``directory``; :func:`trainer_results` reads what it produced."""
    plan_file, out_file = directory / f"plan_{nproc}.json", directory / f"results_{nproc}.json"
    plan_file.write_text(json.dumps(plan))
    return nproc, WORKER, [plan_file, out_file], seconds


def trainer_results(directory: Path, nproc: int) -> dict:
    """``{name: [step metrics]}`` of the :func:`trainer_job` of ``nproc`` processes in ``directory``."""
    return json.loads((directory / f"results_{nproc}.json").read_text())


def read_rollouts(path: Path) -> list:
    """The rows of a JSONL rollout file (as :func:`write_rollouts` returned them)."""
    return [json.loads(line) for line in path.read_text().splitlines()]
