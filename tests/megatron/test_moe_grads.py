"""The plugin's loss on a real Megatron-Core MoE GPT (top-2 routing over 4 experts, the aux load-balancing
loss on, fp32, Megatron DDP, the real schedules, gloo on CPU) at expert-parallel layouts, with both token
dispatchers: the full gradient of every exact aggregation mode equals the one-process reference.

Layouts (``megatron_rl_agg.parallel.layout.parse_layout``; ``ep`` multiplies the process count, Megatron's DP
size is ``dp * ep``):
``ep2+m2`` (2 processes: EP2, expert-DP 1), ``dp2+ep2`` (4: EP2, expert-DP 2) and ``tp2+ep2+m2`` (4: TP2
with sequence parallelism, EP2), each with the ``alltoall`` and the ``allgather`` dispatcher, against
``dp1+m4`` in one process. Every layout cuts the mini-batch into the same four micro-batches of two
rows (``M * D = 4``): the aux loss is a per-micro-batch statistic that Megatron averages over
micro-batches and DP ranks, so the same partition must give the same aux gradient, and the policy term
(global weights) is exact whatever the partition. The worker (``worker_moe_grads.py``) documents the
model and the batch. Differences are ``max|g - g_ref| / max|g_ref|`` per tensor.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from torchrun_utils import load_result, max_rel_diff  # noqa: E402

pytestmark = pytest.mark.slow

WORKER = pathlib.Path(__file__).with_name("worker_moe_grads.py")
TOL = 1e-5
MODES = ["token_mean", "token_sum", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm",
         "prompt_mean"]
DISPATCHERS = ["alltoall", "allgather"]
REF = "dp1+m4:alltoall"
# ":flag": the plugin's loss under calculate_per_token_loss=True (its 3-tuple); ":flagraw": Megatron's own
# aux-loss scaling under the flag with a zero main loss, at TP2 where the plugin refuses the flag.
FLAG_TP1 = ["dp1+m4:alltoall:flag", "ep2+m2:allgather:flag", "dp2+ep2:alltoall:flag"]
FLAG_TP2 = [f"tp2+ep2+m2:{d}:flagraw" for d in DISPATCHERS]
LAUNCHES = {
    1: [REF, "dp1+m4:allgather", "aux-parts", FLAG_TP1[0], "padding"],
    2: [f"ep2+m2:{d}" for d in DISPATCHERS] + [FLAG_TP1[1]],
    4: [f"{layout}:{d}" for layout in ("dp2+ep2", "tp2+ep2+m2") for d in DISPATCHERS] + [FLAG_TP1[2]] + FLAG_TP2,
}
LAYOUT_ITEMS = [item for nproc in (1, 2, 4) for item in LAUNCHES[nproc]
                if item not in (REF, "aux-parts", "padding") and not item.endswith(("flag", "flagraw"))]
MICROBATCHES = {"dp1+m4": 4, "ep2+m2": 2, "dp2+ep2": 1, "tp2+ep2+m2": 2}


def worker_jobs(directory):
    """This module's share of the session's shared launches (``tests/conftest.py``)."""
    return [(nproc, WORKER, [directory, *items], 600) for nproc, items in LAUNCHES.items()]


@pytest.fixture(scope="module")
def out_dir(shared_jobs):
    return shared_jobs


def result(out_dir, item, config):
    return load_result(out_dir, f"{item}-{config}")


@pytest.mark.parametrize("mode", MODES)
def test_moe_gradient_with_calculate_per_token_loss(out_dir, mode):
    """The plugin's 3-tuple under the flag (DP1 x M4, EP2 allgather, DP2 x EP2): the same gradient as the
    flag-off reference, aux loss included (num_tokens is the real-token count the masked router scales by)."""
    ref = result(out_dir, REF, mode)["grads"]
    for item in FLAG_TP1:
        rel, key = max_rel_diff(result(out_dir, item, mode)["grads"], ref)
        assert rel <= TOL, f"{mode} at {item}: {key} differs from {REF} by {rel:.3e}"


@pytest.mark.parametrize("mode", MODES)
def test_moe_gradient_equal_at_expert_parallel_layouts(out_dir, mode):
    ref = result(out_dir, REF, mode)["grads"]
    # Every tensor gets a gradient; expert weights are stacked [layer, expert, ...] from their EP ranks.
    assert all(g.abs().max() > 0 for g in ref.values())
    assert ref["decoder.layers.mlp.experts.experts.linear_fc1.weight"].shape[:2] == (2, 4)
    assert ref["decoder.layers.mlp.router.weight"].shape == (2, 4, 32)
    for item in LAYOUT_ITEMS:
        rel, key = max_rel_diff(result(out_dir, item, mode)["grads"], ref)
        assert rel <= TOL, f"{mode} at {item}: {key} differs from {REF} by {rel:.3e}"


def _split_zero(ref):
    """Keys with a nonzero reference gradient, and keys whose reference gradient is exactly 0."""
    nonzero = [k for k, g in ref.items() if g.abs().max() > 0]
    return nonzero, [k for k in ref if k not in nonzero]


def test_aux_only_gradient_is_megatrons_micro_batch_average(out_dir):
    """Advantages 0, no KL / entropy: the only gradient is the aux loss's. At M = 4 it equals the mean of
    the four micro-batches' gradients run one at a time (M = D = 1, where Megatron scales the aux loss
    by 1): the plugin leaves the aux loss at Megatron's 1 / (M * D) scale. A plugin that multiplied it
    by M * D, as it does the policy term, would be 4x off."""
    ref = result(out_dir, REF, "aux_only")["grads"]
    parts = load_result(out_dir, "aux-parts")["grads"]
    nonzero, zero = _split_zero(ref)
    # The output layer's own norm is not on the aux loss's path; the router and experts are.
    assert zero == ["decoder.final_layernorm.bias", "decoder.final_layernorm.weight"]
    assert "decoder.layers.mlp.router.weight" in nonzero
    rel, key = max_rel_diff({k: parts[k] for k in nonzero}, {k: ref[k] for k in nonzero})
    assert rel <= 1e-6, f"aux-only gradient at M=4 vs the micro-batch mean: {key} differs by {rel:.3e}"


def test_aux_only_gradient_equal_across_layouts_and_dispatchers(out_dir):
    ref = result(out_dir, REF, "aux_only")["grads"]
    nonzero, zero = _split_zero(ref)
    for item in LAYOUT_ITEMS:
        got = result(out_dir, item, "aux_only")["grads"]
        rel, key = max_rel_diff({k: got[k] for k in nonzero}, {k: ref[k] for k in nonzero})
        assert rel <= TOL, f"aux-only at {item}: {key} differs by {rel:.3e}"
        assert all(torch.count_nonzero(got[k]) == 0 for k in zero), item


def test_aux_only_gradient_with_calculate_per_token_loss(out_dir):
    """Under the flag (DDP sums, finalize_model_grads divides by the total routed-token count N, the router
    multiplies each micro-batch's aux loss by its routed tokens) the aux-only gradient of the plugin's
    3-tuple is the flag-off one at TP1 (DP1 x M4, EP2, DP2 x EP2). At TP2 (sequence parallel) megatron-core
    0.16 scales by the TP shard's tokens: exactly 1/2 of it (NVIDIA/Megatron-LM#5047), which
    setup_checks.check_moe_setup refuses; a router with the upstream fix (0.19) gives the flag-off
    gradient itself, and the check lets it through."""
    from megatron_rl_agg.mcore.setup_checks import _router_scales_aux_by_tp_cp

    fixed = _router_scales_aux_by_tp_cp()
    ref = result(out_dir, REF, "aux_only")["grads"]
    nonzero, _ = _split_zero(ref)
    for item in FLAG_TP1:
        got = result(out_dir, item, "aux_only")["grads"]
        rel, key = max_rel_diff({k: got[k] for k in nonzero}, {k: ref[k] for k in nonzero})
        assert rel <= TOL, f"aux-only with the flag at {item}: {key} differs by {rel:.3e}"
    for item in FLAG_TP2:
        got = result(out_dir, item, "aux_only")
        factor = 1.0 if fixed else 2.0
        rel, key = max_rel_diff({k: factor * got["grads"][k] for k in nonzero}, {k: ref[k] for k in nonzero})
        assert rel <= TOL, f"{item}: {factor} x the aux-only gradient differs from the flag-off one by {rel:.3e}"
        if fixed:
            assert got["refusal"] is None, got["refusal"]
        else:
            assert "2x too small (NVIDIA/Megatron-LM#5047" in got["refusal"]


def test_aux_loss_metric_is_layout_independent(out_dir):
    """Megatron's tracker holds, per layer, the load-balancing loss (before the coefficient) summed over
    this rank's micro-batches and averaged over DP ranks; divided by M it is the mean per micro-batch,
    the same at every layout. Near 1 per layer at this balanced initialisation, 2 layers."""
    ref = result(out_dir, REF, "token_mean")["aux_loss"] / MICROBATCHES["dp1+m4"]
    assert 1.5 < ref < 2.5
    for item in LAYOUT_ITEMS:
        layout = item.partition(":")[0]
        for config in MODES + ["aux_only"]:
            value = result(out_dir, item, config)["aux_loss"] / MICROBATCHES[layout]
            assert value == pytest.approx(ref, rel=1e-5), (item, config)


def _nonzero_rel(got, ref):
    nonzero, _ = _split_zero(ref)
    return max_rel_diff({k: got[k] for k in nonzero}, {k: ref[k] for k in nonzero})


@pytest.mark.parametrize("flag", ["", "-flag"])
def test_padding_rows_and_columns_leave_the_aux_loss(out_dir, flag):
    """Two rows of 7 real tokens (``ref``, no padding) against the same rows padded to 12 columns plus a
    padding row (``padded``, ``token_mask`` 0 there): the router's per-expert counts (the aux loss's
    ``f_i``), the tracked aux loss and the aux-only gradient are the same, with and without
    calculate_per_token_loss. Without the padding mask the counts would hold 36 tokens, not 14."""
    got = load_result(out_dir, "padding")
    ref, padded = got[f"ref{flag}"], got[f"padded{flag}"]
    assert ref["counts"].shape == (2, 4)                              # 2 MoE layers x 4 experts
    assert ref["counts"].sum(1).tolist() == [2 * 7 * 2] * 2            # 14 real tokens x top-2
    assert torch.equal(padded["counts"], ref["counts"])
    assert padded["aux_loss"] == pytest.approx(ref["aux_loss"], rel=1e-6)
    rel, key = _nonzero_rel(padded["grads"], ref["grads"])
    assert rel <= TOL, f"padded{flag}: {key} differs from the unpadded rows by {rel:.3e}"


@pytest.mark.parametrize("flag", ["", "-flag"])
def test_a_micro_batch_of_padding_rows_only_is_left_out_of_the_aux_loss(out_dir, flag):
    """``empty``: the padded rows, then a second micro-batch of padding rows only (what a data-parallel
    rank padded with whole micro-batches runs). It runs (no NaN: Megatron's aux loss would divide by a
    zero real-token count) and its aux loss is left out: only the first micro-batch's counts are
    recorded; the gradient is 1/2 of the reference (Megatron averages the aux loss over M = 2
    micro-batches), with the flag too (aux_scale N / (M * D * n_k) = 1/2 restores the flag-off weight)."""
    got = load_result(out_dir, "padding")
    ref, empty = got[f"ref{flag}"], got[f"empty{flag}"]
    assert all(torch.isfinite(g).all() for g in empty["grads"].values())
    assert torch.equal(empty["counts"], ref["counts"])
    rel, key = _nonzero_rel({k: 2.0 * g for k, g in empty["grads"].items()}, ref["grads"])
    assert rel <= TOL, f"empty{flag}: 2 x {key} differs from the reference by {rel:.3e}"


def test_moe_grad_scale_func_scales_the_aux_gradient(out_dir):
    """megatron-core >= 0.19: ``moe_grad_scale_func`` returning 2 gives twice the aux-only gradient of the
    reference rows; mcore.build.build_optimizer sets it to the optimizer's loss scale (1 in fp32); 0.16 has no such
    field and no item is saved."""
    got = load_result(out_dir, "padding")
    from megatron.core.model_parallel_config import ModelParallelConfig

    if "moe_grad_scale_func" not in ModelParallelConfig.__dataclass_fields__:
        assert "scale2" not in got and "optimizer_scale" not in got
        return
    assert got["optimizer_scale"] == 1.0
    rel, key = _nonzero_rel({k: 0.5 * g for k, g in got["scale2"]["grads"].items()}, got["ref"]["grads"])
    assert rel <= TOL, f"moe_grad_scale_func 2: half of {key} differs from the reference by {rel:.3e}"
