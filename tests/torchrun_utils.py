"""Launch multi-process workers with torchrun from pytest, and compare their per-layout results.

Every Megatron test of the project runs its worker script through :func:`run_torchrun`
(gloo on CPU, one thread per process). Start-up dominates (a Megatron import is ~5 s per process),
so a worker should run several layouts in one launch, destroying and re-initialising the
model-parallel state in between, and save one result file per layout with :func:`save_result`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

JOBS_WORKER = pathlib.Path(__file__).with_name("worker_jobs.py")

__all__ = ["REPO_ROOT", "run_torchrun", "run_jobs", "result_path", "save_result", "load_result", "max_rel_diff"]


def run_torchrun(script, nproc: int, args=(), *, timeout: float = 300, env=None) -> str:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node nproc script *args``.

    ``--standalone`` makes torchrun host its rendezvous store on a port the OS picks, so concurrent
    launches never collide. Every process gets ``OMP_NUM_THREADS=1`` and the repository root on
    ``PYTHONPATH``.

    Returns:
        The combined stdout of all ranks.

    Raises:
        RuntimeError: on a non-zero exit, with the command and the last 6000 characters of stderr.
        subprocess.TimeoutExpired: after ``timeout`` seconds (torchrun and its workers are killed).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *map(str, args)]
    run_env = dict(os.environ)
    run_env.update(env or {})
    run_env["OMP_NUM_THREADS"] = "1"
    run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), run_env.get("PYTHONPATH")]))
    # A session of its own, so that a timeout kills torchrun AND its workers (killing torchrun alone
    # would leave the ranks running).
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(
            f"torchrun exited with {proc.returncode}: {' '.join(cmd)}\n"
            f"--- stdout tail ---\n{stdout[-2000:]}\n--- stderr tail ---\n{stderr[-6000:]}"
        )
    return stdout


def run_jobs(nproc: int, jobs, jobs_file, *, timeout: float) -> str:
    """Run ``jobs`` (``[(worker script, argv)]``, each script defining ``run(argv)``) in ONE torchrun
    launch of ``nproc`` processes (``tests/worker_jobs.py``); ``jobs_file`` is where the job list is
    written. Returns the combined stdout; raises as :func:`run_torchrun`."""
    jobs_file = pathlib.Path(jobs_file)
    jobs_file.write_text(json.dumps([{"script": str(script), "argv": [str(a) for a in argv]}
                                     for script, argv in jobs]))
    return run_torchrun(JOBS_WORKER, nproc, [jobs_file], timeout=timeout)


def result_path(directory, name: str) -> pathlib.Path:
    """File for result ``name`` (e.g. a layout string ``"pp2+vpp2+m4"``) inside ``directory``."""
    return pathlib.Path(directory) / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".pt")


def save_result(directory, name: str, result: dict) -> pathlib.Path:
    """``torch.save`` a dict (e.g. ``{"grads": {key: tensor}, "grad_norm": float}``) as ``name``."""
    path = result_path(directory, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return path


def load_result(directory, name: str) -> dict:
    """Load what :func:`save_result` stored under ``name``."""
    return torch.load(result_path(directory, name), weights_only=True)


def max_rel_diff(got: dict, ref: dict) -> tuple[float, str]:
    """Largest per-tensor relative difference between two ``{key: tensor}`` dicts.

    For each key: ``max|got - ref| / max|ref|`` (the error relative to the tensor's scale, which
    stays meaningful where single elements are near zero). Returns ``(worst, its key)``.

    Raises:
        KeyError: if the key sets differ (names the keys on either side only).
        ValueError: on a shape mismatch, or a reference tensor that is identically zero.
    """
    if set(got) != set(ref):
        raise KeyError(f"key sets differ: only in got {sorted(set(got) - set(ref))}, "
                       f"only in ref {sorted(set(ref) - set(got))}")
    worst, worst_key = 0.0, ""
    for key, r in ref.items():
        g = got[key]
        if g.shape != r.shape:
            raise ValueError(f"{key}: shape {tuple(g.shape)} vs reference {tuple(r.shape)}")
        scale = r.double().abs().max().item()
        if scale == 0.0:
            raise ValueError(f"{key}: reference tensor is all zeros; a relative difference is undefined")
        rel = (g.double() - r.double()).abs().max().item() / scale
        if rel > worst or not worst_key:
            worst, worst_key = rel, key
    return worst, worst_key
