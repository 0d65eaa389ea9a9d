"""The CPU demo (scripts/run_cpu_demo.sh) in a short form: it runs, logs, plots, and the reward rises."""

import json
import os
import subprocess
import sys

import pytest

from trainer_helpers import REPO

pytestmark = pytest.mark.slow

STEPS = 150


def test_cpu_demo_short_run_reward_rises(tmp_path):
    # VENV: the environment running the tests (scripts/test_compat.sh runs them in another one).
    env = {**os.environ, "SKIP_SETUP": "1", "OUT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "VENV": sys.prefix}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "run_cpu_demo.sh"), "--train-iters", str(STEPS),
                           "--no-progress-bar"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first = sum(r["reward_mean"] for r in rows[:10]) / 10
    last = sum(r["reward_mean"] for r in rows[-10:]) / 10
    # Chance level is ~0.07-0.09; the full 400-step demo reaches ~0.8 (docs/training.md). After 150 steps
    # the policy has learned to answer with digits (0.2) and part of the counting.
    assert first < 0.15 and last > first + 0.2, (first, last)
    assert sum(r["num_failed_samples"] for r in rows) > 0           # the demo loses 5% of its samples
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(tmp_path / "tb")
               for name in files)
    assert "mean reward: first 10 steps" in proc.stdout
