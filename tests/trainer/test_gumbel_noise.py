"""On-policy sampling noise drawn one decode step at a time (``GumbelNoise``) is, bit for bit, the noise of
the formula generation used before (one ``[R, N, V]`` float64 uniform draw of the step, sliced to the rank's
rows: written out below), so the same seed samples the same tokens; and its peak memory does not grow with
the step's total number of rows (the old formula's does, measured the same way)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from megatron_rl_agg.trainer.rollout.generation import GumbelNoise, RolloutSpec, sample_tokens, step_generator

SEED, STEP = 7, 3
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _spec(num_prompts: int, n: int = 2, max_new: int = 5, vocab: int = 11) -> RolloutSpec:
    return RolloutSpec(task=None, num_prompts=num_prompts, samples_per_prompt=n, max_new_tokens=max_new,
                       temperature=0.7, failure_prob=0.0, vocab_size=vocab, seed=SEED)


def _old_noise(spec: RolloutSpec, rows: slice) -> torch.Tensor:
    """The formula of the old ``gumbel_noise``: ``[rows, N, V]`` from one draw of every row of the step."""
    u = torch.rand((spec.num_rows, spec.max_new_tokens, spec.vocab_size),
                   generator=step_generator(spec.seed, STEP, "sample"), dtype=torch.float64)[rows]
    return -torch.log(-torch.log(u.clamp(min=1e-300)))


@pytest.mark.parametrize("start,end", [(0, 6), (2, 5), (5, 6), (3, 3)])
def test_per_step_draws_equal_the_old_formula_and_tokens(start, end):
    """The cached generation's pattern: rows start sampling at different passes (prompt lengths) and stop
    at different positions (EOS); every drawn row equals the old noise, inactive rows get zeros, and the
    Gumbel-max tokens are the old ones."""
    spec = _spec(3)
    old = _old_noise(spec, slice(start, end))                                  # [rows, N, V]
    noise = GumbelNoise(spec, STEP, start, end)
    rows = end - start
    first = torch.tensor([0, 2, 1, 0, 3, 1][:rows])                            # pass of each row's token 0
    stop = torch.tensor([5, 3, 4, 1, 2, 5][:rows])                             # tokens each row draws
    logits = torch.randn(rows, spec.vocab_size, generator=torch.Generator().manual_seed(1))
    for t in range(8):
        j = t - first
        active = (j >= 0) & (j < stop)
        got = noise.draw(j.clamp(0, spec.max_new_tokens - 1), active)
        for i in range(rows):
            if active[i]:
                assert torch.equal(got[i], old[i, j[i]]), (i, int(j[i]))
            else:
                assert not got[i].any()
        if bool(active.any()):
            new_tokens = sample_tokens(logits, got, spec.temperature)[active]
            old_tokens = sample_tokens(logits, old[torch.arange(rows), j.clamp(0, spec.max_new_tokens - 1)],
                                       spec.temperature)[active]
            assert torch.equal(new_tokens, old_tokens)


def test_skip_crosses_block_boundaries():
    """Rows far into the stream, with a skip buffer smaller than a row: still the old values."""
    spec = _spec(40, n=1, max_new=3, vocab=37)
    noise = GumbelNoise(spec, STEP, 31, 34)
    noise.BLOCK = 50                                                          # < N * V = 111
    old = _old_noise(spec, slice(31, 34))
    every = torch.ones(3, dtype=torch.bool)
    for j in range(3):
        assert torch.equal(noise.draw(torch.full((3,), j), every), old[:, j])


def test_out_of_order_draws_are_refused():
    spec = _spec(2)
    noise = GumbelNoise(spec, STEP, 0, 4)
    every = torch.ones(4, dtype=torch.bool)
    noise.draw(torch.zeros(4, dtype=torch.int64), every)
    with pytest.raises(RuntimeError, match=r"row 0 asks for the noise of position 0; its next is 1 of 5"):
        noise.draw(torch.zeros(4, dtype=torch.int64), every)
    with pytest.raises(ValueError, match=r"rows \[2, 9\) are not within the step's 4 rows"):
        GumbelNoise(spec, STEP, 2, 9)


_PEAK = """
import json, sys, torch
from megatron_rl_agg.trainer.rollout.generation import GumbelNoise, RolloutSpec, step_generator
def status_mib(field):
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 1024
rows, old = int(sys.argv[1]), sys.argv[2] == "old"
spec = RolloutSpec(task=None, num_prompts=rows, samples_per_prompt=1, max_new_tokens=16, temperature=1.0,
                   failure_prob=0.0, vocab_size=4096, seed=1)
every = torch.ones(4, dtype=torch.bool)
with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
    fh.write("5")                                # VmHWM := VmRSS (Linux >= 4.0)
before = status_mib("VmRSS")
if old:
    u = torch.rand((rows, 16, 4096), generator=step_generator(1, 0, "sample"), dtype=torch.float64)[rows - 4:]
    g = -torch.log(-torch.log(u.clamp(min=1e-300)))
else:
    noise = GumbelNoise(spec, 0, rows - 4, rows)               # the last 4 rows: the longest skip
    for j in range(16):
        noise.draw(torch.full((4,), j), every)
print(json.dumps(status_mib("VmHWM") - before))
"""


def _peak_mib(rows: int, route: str) -> float:
    # The caller's PYTHONPATH stays behind the repository: the compatibility run keeps its release there.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", _PEAK, str(rows), route], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_the_steps_rows():
    """Peak resident memory (the rise of ``VmHWM`` above ``VmRSS`` while drawing, in a fresh process) of the last 4 rows of
    a step of 8 and of 1024 rows (N = 16, V = 4096: the old tensor of 1024 rows is 512 MiB)."""
    small, large = _peak_mib(8, "new"), _peak_mib(1024, "new")
    old_large = _peak_mib(1024, "old")
    print(f"GumbelNoise peak growth: 8 rows {small:.1f} MiB, 1024 rows {large:.1f} MiB; "
          f"old formula at 1024 rows {old_large:.1f} MiB")
    assert large - small < 16, (small, large)
    assert old_large > 400, old_large          # the measurement sees the old [R, N, V] tensor
