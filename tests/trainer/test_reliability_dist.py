"""Faults on real multi-process runs (2 ranks, gloo): signals, a killed rank, a stopped rank, damaged and
foreign checkpoints, non-finite updates. Four torchrun launches:

1. SIGINT (to the whole process group, as a Ctrl-C) mid-run: the run finishes its step, saves it, exits.
2. SIGKILL of rank 1 while it saves step 2: the launch ends at once with torchrun naming the rank; the
   tracker still names step 1.
3. SIGSTOP of rank 1: rank 0 ends within ``--distributed-timeout-minutes`` (6 s here) with an error that
   names rank 1.
4. One launch of many runs: the uninterrupted reference; the resume of (1), whose metrics file then holds
   every step once and whose final weights equal the reference's; the resume of (2) from step 1; a fresh
   run against the reference's --save (refused, every file untouched); a model mismatch; nothing left to
   train; a truncated latest checkpoint (error, then --load-fallback); a rollout file whose ratios
   overflow (the same error on both ranks, also with the distributed optimizer; with --on-nonfinite skip
   nothing reaches the checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer_helpers import MODEL_ARGS, REPO

pytestmark = pytest.mark.slow

WORKER = REPO / "tests" / "trainer" / "reliability_worker.py"
ON_POLICY = [*MODEL_ARGS, "--global-batch-size", "16", "--num-samples-per-prompt", "4",
             "--micro-batch-size", "4", "--rollout-failure-prob", "0.1", "--lr", "3e-3",
             "--entropy-coef", "0.01"]


def _start(plan: list, out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(out / "plan.json"), str(out)]
    # A session of its own: the signal goes to torchrun (which forwards it to its workers, each in a session
    # of their own), as a Ctrl-C in a terminal would. Output to a file: nothing blocks on a full pipe.
    log = open(out / "log.txt", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.out = out
    return proc


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and both workers (they run in sessions of their own: killpg misses them)."""
    for pid_file in proc.out.glob("pid*"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _log(proc: subprocess.Popen) -> str:
    return (proc.out / "log.txt").read_text()


def _wait(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            raise AssertionError(f"condition not reached; output:\n{_log(proc)[-4000:]}")
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise AssertionError(f"launch still running after {timeout} s:\n{_log(proc)[-4000:]}") from None
    return _log(proc)


def _lines(path: Path) -> list:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _flat(ckpt_dir: Path, tmp: Path) -> dict:
    """Every tensor of a dist_checkpointing directory (model and optimizer), read in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp / (ckpt_dir.parent.name + ckpt_dir.name + ".pt")
    dcp_to_torch_save(str(ckpt_dir), str(target))
    return {k: v for k, v in torch.load(target, weights_only=False).items() if isinstance(v, torch.Tensor)}


def _bad_rollouts(path: Path) -> None:
    rows = [{"prompt_id": f"p{g}", "prompt": [1, 2, 3], "response": [4, 5, 6], "reward": float(i),
             "finish_reason": "stop", "logprobs": [-87.0, -87.0, -87.0]} for g in range(2) for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rel")
    out = {}
    # 1. SIGINT after step 3 is logged
    sig_argv = ["--train-iters", "1000", "--save", str(tmp / "ckS"), "--metrics-file", str(tmp / "sig.jsonl")]
    sig = _start([{"name": "sig", "argv": ON_POLICY + sig_argv}], tmp / "l1")
    _wait(lambda: len(_lines(tmp / "sig.jsonl")) >= 3, 300, sig)
    os.killpg(sig.pid, signal.SIGINT)
    out["sig_output"] = _finish(sig, 120)
    out["sig_stopped_after"] = _lines(tmp / "sig.jsonl")[-1]["step"]
    out["sig_tracker"] = (tmp / "ckS" / "latest_checkpointed_iteration.txt").read_text().strip()

    # 2. rank 1 killed while step 2 is being saved (the step directory appears first)
    kill = _start([{"name": "kill", "argv": ON_POLICY + ["--train-iters", "4", "--save", str(tmp / "ckK"),
                                                         "--save-interval", "1"]}], tmp / "l2")
    _wait(lambda: (tmp / "ckK" / "iter_0000002").exists() and (tmp / "l2" / "pid1").exists(), 300, kill)
    os.kill(int((tmp / "l2" / "pid1").read_text()), signal.SIGKILL)
    t0 = time.monotonic()
    out["kill_output"] = _finish(kill, 120)
    out["kill_seconds"] = time.monotonic() - t0
    out["kill_rc"] = kill.returncode
    out["kill_tracker"] = (tmp / "ckK" / "latest_checkpointed_iteration.txt").read_text().strip()

    # 3. rank 1 stopped after step 1: rank 0 must end on its own within the timeout
    stop_argv = ["--train-iters", "1000", "--distributed-timeout-minutes", "0.1", "--metrics-file",
                 str(tmp / "stop.jsonl")]
    stop = _start([{"name": "stop", "argv": ON_POLICY + stop_argv}], tmp / "l3")
    _wait(lambda: len(_lines(tmp / "stop.jsonl")) >= 1 and (tmp / "l3" / "pid1").exists(), 300, stop)
    pid1 = int((tmp / "l3" / "pid1").read_text())
    os.kill(pid1, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        _wait(lambda: (tmp / "l3" / "rank0.json").exists(), 90, stop)
        out["stop_seconds"] = time.monotonic() - t0
    finally:
        os.kill(pid1, signal.SIGKILL)        # the stopped rank cannot act on torchrun's SIGTERM
    out["stop_output"] = _finish(stop, 120)
    out["stop"] = json.loads((tmp / "l3" / "rank0.json").read_text())["stop"]

    # 4. everything that ends normally, in one launch
    _bad_rollouts(tmp / "bad.jsonl")
    offline = [*MODEL_ARGS, "--rollouts", str(tmp / "bad.jsonl"), "--global-batch-size", "8",
               "--micro-batch-size", "4"]
    ref, ckc = tmp / "ckRef", tmp / "ckC"
    plan = [
        {"name": "ref", "argv": ON_POLICY + ["--train-iters", "6", "--save", str(ref), "--save-interval", "3",
                                             "--metrics-file", str(tmp / "ref.jsonl")]},
        {"name": "sig_resume", "argv": ON_POLICY + ["--train-iters", "6", "--load", str(tmp / "ckS"),
                                                    "--save", str(tmp / "ckS"),
                                                    "--metrics-file", str(tmp / "sig.jsonl")]},
        {"name": "kill_resume", "argv": ON_POLICY + ["--train-iters", "2", "--load", str(tmp / "ckK")]},
        {"name": "foreign", "argv": ON_POLICY + ["--train-iters", "2", "--save", str(ref)],
         "digest": str(ref)},
        {"name": "mismatch", "argv": ON_POLICY + ["--hidden-size", "64", "--train-iters", "8",
                                                  "--load", str(ref)]},
        {"name": "nothing_left", "argv": ON_POLICY + ["--train-iters", "6", "--load", str(ref)]},
        {"name": "corrupt", "argv": ON_POLICY + ["--train-iters", "7", "--load", str(ckc)],
         "ops": [{"op": "copy", "src": str(ref), "dst": str(ckc)},
                 {"op": "truncate", "path": str(ckc / "iter_0000006" / "__0_0.distcp"), "bytes": 100}]},
        {"name": "fallback", "argv": ON_POLICY + ["--train-iters", "4", "--load", str(ckc),
                                                  "--load-fallback"]},
        # The loss clamps log r at 20 (core.policy_losses.LOG_RATIO_BOUND), so the -87 behaviour log-probs
        # train finitely ("clamped"); lifting the clamp (as a stack without it) overflows the ratio, which
        # is what the non-finite guard must catch.
        {"name": "clamped", "argv": offline + ["--train-iters", "1"]},
        {"name": "nonfinite", "argv": offline + ["--train-iters", "2"], "log_ratio_bound": 1e4},
        {"name": "nonfinite_distopt", "argv": offline + ["--train-iters", "1", "--use-distributed-optimizer"],
         "log_ratio_bound": 1e4},
        {"name": "nonfinite_skip", "argv": offline + ["--train-iters", "2", "--on-nonfinite", "skip",
                                                      "--save", str(tmp / "ckN")], "log_ratio_bound": 1e4},
        {"name": "init", "argv": ON_POLICY + ["--train-iters", "1", "--lr", "0", "--save", str(tmp / "ck0")]},
    ]
    proc = _start(plan, tmp / "l4")
    out["l4_output"] = _finish(proc, 900)
    out["r0"] = json.loads((tmp / "l4" / "rank0.json").read_text())
    out["r1"] = json.loads((tmp / "l4" / "rank1.json").read_text())
    return tmp, out


def test_sigint_then_resume_logs_each_step_once_with_the_uninterrupted_weights(launches):
    tmp, out = launches
    k = out["sig_stopped_after"]
    assert 3 <= k < 6, out["sig_output"][-3000:]
    assert "stopped by a signal after step" in out["sig_output"]
    assert out["sig_tracker"] == str(k)
    assert [m["step"] for m in out["r0"]["sig_resume"]["history"]] == list(range(k + 1, 7))
    assert [m["step"] for m in _lines(tmp / "sig.jsonl")] == [1, 2, 3, 4, 5, 6]
    ref, got = _flat(tmp / "ckRef" / "iter_0000006", tmp), _flat(tmp / "ckS" / "iter_0000006", tmp)
    assert set(ref) == set(got) and len(ref) > 20
    for key in ref:
        assert torch.equal(ref[key], got[key]), key


def test_killed_rank_ends_the_launch_and_the_previous_checkpoint_loads(launches):
    tmp, out = launches
    assert out["kill_rc"] != 0 and out["kill_seconds"] < 60
    assert "rank" in out["kill_output"] and "SIGKILL" in out["kill_output"], out["kill_output"][-3000:]
    assert out["kill_tracker"] == "1"
    assert [m["step"] for m in out["r0"]["kill_resume"]["history"]] == [2]


def test_stopped_rank_ends_the_run_within_the_timeout_naming_it(launches):
    _, out = launches
    assert out["stop"]["error"] == "DistributedTimeoutError", out["stop"]
    assert "rank(s) [1] did not answer" in out["stop"]["message"]
    assert "--distributed-timeout-minutes 0.1" in out["stop"]["message"]
    assert out["stop_seconds"] < 6 + 10 + 30       # the timeout, the store poll, start-up slack


def test_fresh_run_against_another_runs_save_changes_nothing(launches):
    tmp, out = launches
    res = out["r0"]["foreign"]
    assert res["error"] == "CheckpointError" and "already holds checkpoints of another run" in res["message"]
    assert f"--load {tmp / 'ckRef'}" in res["message"]
    assert res["before"] == res["after"] and len(res["before"]) > 5
    assert out["r1"]["foreign"]["message"] == res["message"]


def test_checkpoint_refusals_and_fallback(launches):
    _, out = launches
    for name in ("mismatch", "corrupt"):
        assert out["r0"][name]["error"] == "CheckpointError" and out["r1"][name] == out["r0"][name]
    assert "--hidden-size 64 (checkpoint: 32)" in out["r0"]["mismatch"]["message"]
    assert "__0_0.distcp has 100 bytes" in out["r0"]["corrupt"]["message"]
    assert "--load-fallback resumes from step 3" in out["r0"]["corrupt"]["message"]
    assert out["r0"]["nothing_left"]["history"] == []
    assert "nothing to train" in out["l4_output"]
    ref = out["r0"]["ref"]["history"][3]                      # step 4 of the uninterrupted run
    got = out["r0"]["fallback"]["history"]
    assert [m["step"] for m in got] == [4]
    for key in ("policy_loss", "entropy", "grad_norm", "reward_mean", "num_tokens"):
        assert got[0][key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key


def test_nonfinite_update_stops_every_rank_and_skip_keeps_the_weights(launches):
    tmp, out = launches
    clamped = out["r0"]["clamped"]["history"]
    assert len(clamped) == 1 and math.isfinite(clamped[0]["grad_norm"]) and clamped[0]["num_skipped_updates"] == 0
    err = out["r0"]["nonfinite"]
    assert err["error"] == "NonFiniteError" and out["r1"]["nonfinite"] == err
    assert "step 1, update 1 of 1: non-finite" in err["message"] and "bad.jsonl:1" in err["message"]
    # the same with the distributed optimizer (gradients sharded over DP: the norm is still global)
    assert out["r0"]["nonfinite_distopt"] == out["r1"]["nonfinite_distopt"] == err
    skipped = out["r0"]["nonfinite_skip"]["history"]
    assert [m["num_skipped_updates"] for m in skipped] == [1, 1]
    weights, init = _flat(tmp / "ckN" / "iter_0000002", tmp), _flat(tmp / "ck0" / "iter_0000001", tmp)
    params = [k for k in init if not k.startswith("optimizer")]
    assert params and all(torch.isfinite(weights[k]).all() for k in weights)
    for key in params:          # every update skipped: the weights are the initial ones (lr 0 run)
        assert torch.equal(weights[key], init[key]), key
