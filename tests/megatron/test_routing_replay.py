"""MoE routing replay R2 (``megatron_rl_agg.mcore.routing_replay``) on a real Megatron-Core MoE GPT.

The worker (``worker_routing_replay.py``) records the routes in the old-log-prob forward, makes the router
noisy (two experts nearly tie and their order flips between the passes) and runs the update with and
without replay, at ``m4``, ``dp2``, ``ep2``, ``cp2``, ``pp2``, ``pp2 x vpp2``, ``tp2 + ep2`` (sequence
parallel), packed (THD) and with full activation recompute (one process and ``pp2``, where 1F1B runs the
recomputed backward of a micro-batch after the next one's forward: the FIFO of ``REPLAY_BACKWARD``).
"""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from torchrun_utils import load_result, max_rel_diff  # noqa: E402

pytestmark = pytest.mark.slow

WORKER = pathlib.Path(__file__).with_name("worker_routing_replay.py")
TOL = 1e-5
REF = "dp1+m4"
LAUNCHES = {
    1: [REF, "dp1+m4:recompute", "dp1+m4:pack", "dp1+m4:r3", "dp1+m4:mask"],
    2: ["dp2+m2", "ep2+m2", "cp2+m4", "pp2+m4", "pp2vpp2+m4", "pp2+m4:recompute"],
    4: ["tp2+ep2+m2"],
}
ITEMS = [item for items in LAUNCHES.values() for item in items]
COMPARED = [item for item in ITEMS if not item.endswith(":recompute")]
SAME_GRADS = [item for item in ITEMS if item not in (REF, "dp1+m4:pack", "dp1+m4:r3", "dp1+m4:mask")]
R2_ITEMS = [item for item in ITEMS if item != "dp1+m4:r3"]


def worker_jobs(directory):
    """This module's share of the session's shared launches (``tests/conftest.py``)."""
    return [(nproc, WORKER, [directory, *items], 240) for nproc, items in LAUNCHES.items()]


@pytest.mark.parametrize("item", COMPARED)
def test_update_routes_equal_recorded_routes(shared_jobs, item):
    """Acceptance 1: with R2 every token of every layer routes in the update to the experts recorded in
    the old-log-prob pass (top-k sets compared per token, summed over all ranks); without replay the
    noisy router changes them for many tokens, so the comparison can fail."""
    got = load_result(shared_jobs, item)
    assert got["routes_shape"] == [8 // (2 if item.startswith(("dp2", "ep2", "tp2")) else 1), 12, 4, 2]
    assert min(got["compared"]) > 0
    assert got["mismatch"] == [0.0] * 4, item
    assert min(got["mismatch_free"]) > 0.1, got["mismatch_free"]


def test_r3_file_routes_are_the_ones_used(shared_jobs):
    """Acceptance 3: the routes of a rollout file (read by the trainer's reader, laid out by its row
    builder, padding positions and rows given padding routes) are the experts every token used in the
    update, compared per token and layer; the live router chooses others for most tokens."""
    got = load_result(shared_jobs, "dp1+m4:r3")
    assert got["mismatch"] == [0.0] * 4 and min(got["compared"]) == 96
    assert min(got["mismatch_free"]) > 0.3, got["mismatch_free"]


@pytest.mark.parametrize("item", R2_ITEMS)
def test_step_one_ratio_is_one_with_replay(shared_jobs, item):
    """Acceptance 2: same weights, noisy router: |ppo_kl| < 1e-6 with R2 (the gate values move by O(eps)
    only), and far above it without replay (other experts)."""
    got = load_result(shared_jobs, item)
    assert abs(got["ppo_kl"]) < 1e-6, got["ppo_kl"]
    assert abs(got["ppo_kl_free"]) > 1e-5, got["ppo_kl_free"]


@pytest.mark.parametrize("item", SAME_GRADS)
def test_replayed_gradient_equals_single_process(shared_jobs, item):
    """Acceptance 4: the full gradient with replay equals the one-process reference (rel <= 1e-5) at
    every layout, recompute included; without replay it does not (the noisy router routes elsewhere)."""
    ref = load_result(shared_jobs, REF)
    rel, key = max_rel_diff(load_result(shared_jobs, item)["grads"], ref["grads"])
    assert rel <= TOL, f"{item}: {key} differs from {REF} by {rel:.3e}"
    rel_free, _ = max_rel_diff(ref["grads_free"], ref["grads"])
    assert rel_free > 1e-2


@pytest.mark.parametrize("item", R2_ITEMS)
def test_routing_mismatch_metric_exact_over_ranks(shared_jobs, item):
    """The routing-mismatch metric of the replayed update (``routing_replay.MismatchCounter``: per layer,
    tokens whose live top-k differs from the replayed one, summed over all ranks): at the first MoE layer
    the live router sees the same hidden states as in the run without replay, so it equals the measured
    fraction of tokens routed elsewhere without replay exactly; every layout (recompute included: the
    recomputed forward is not counted twice) gives the one-process values."""
    got = load_result(shared_jobs, item)
    ref = load_result(shared_jobs, REF)
    assert len(got["metric"]) == 4 and all(0 < m <= 1 for m in got["metric"])
    if item in ("dp1+m4:pack", "dp1+m4:mask"):   # padding left out: other counts
        return
    assert got["metric"][0] == pytest.approx(ref["mismatch_free"][0], abs=1e-12)
    assert got["metric"] == pytest.approx(ref["metric"], abs=1e-12), item


def test_routing_mismatch_metric_leaves_out_padding(shared_jobs):
    """``dp1+m4:mask``: the batch's right-padding columns get ``token_mask`` 0, so the router gets the padding
    mask; the metric then counts real tokens only: at the first MoE layer it equals the fraction of REAL
    tokens routed elsewhere without replay (compared in the worker on real tokens only), which differs
    from the all-token fraction of the reference."""
    got = load_result(shared_jobs, "dp1+m4:mask")
    ref = load_result(shared_jobs, REF)
    assert got["compared"][0] < ref["compared"][0]
    assert got["metric"][0] == pytest.approx(got["mismatch_free"][0], abs=1e-12)
    assert got["metric"][0] != pytest.approx(ref["metric"][0], abs=1e-6)
