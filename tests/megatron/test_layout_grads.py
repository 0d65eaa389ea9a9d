"""Real Megatron-Core (GPTModel, DDP, schedules, optimizer) on CPU/gloo: the full gradient of the
product's loss (``mcore.batch.prepare_microbatches`` + ``mcore.loss.forward_step``: a token-mean policy
term and a token-mean entropy bonus over the whole mini-batch) after one forward-backward is the same at
every TP/PP/VPP/CP/DP/micro-batch layout, and with ``calculate_per_token_loss=True`` (Megatron's 3-tuple
contract) at DP2, CP2 and CP2 x TP2.

The worker (``worker_layout_grads.py``) documents the loss; it scales nothing itself, so the test proves
the product's scale factors. The reference is the one-process, one-micro-batch run; every other layout
must match it to 1e-5 relative per tensor (``max|g - g_ref| / max|g_ref|``), which holds only if the
product's scaling cancels the schedule's ``/num_microbatches`` and DDP's ``/dp`` (or, under the 3-tuple,
``finalize_model_grads``' division by the routed tokens) and if the layout-independent init gives every
layout the same full weights. ``token_mean_legacy`` (the per-micro-batch token mean) is run as a
negative control: with unequal row lengths it must give a clearly different gradient.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from torchrun_utils import load_result, max_rel_diff  # noqa: E402

from megatron_rl_agg.parallel.layout import Layout, parse_layout  # noqa: E402

WORKER = pathlib.Path(__file__).with_name("worker_layout_grads.py")
TOL = 1e-5
# One process: the reference, micro-batching, a repeat of the reference, the negative control.
SINGLE = ["dp1+m1", "dp1+m4", "dp1+m1", "dp1+m4:mbmean"]
TWO = ["dp2+m2", "tp2", "pp2+m4", "pp2+vpp2+m4", "dp2+m2:distopt", "cp2+m2", "cp2+m2:flag", "dp2+m2:flag"]
FOUR = ["tp2+pp2+m4", "dp2+pp2+m2", "dp2+tp2+m2", "cp2+dp2+m2", "cp2+tp2+m2:flag"]


def _load(directory, items):
    """``[(item, result)]`` in launch order (an item may repeat)."""
    return [(item, load_result(directory, f"{index:02d}-{item}")) for index, item in enumerate(items)]


@pytest.mark.parametrize("text,expected", [
    ("dp2+m2", Layout(dp=2, num_microbatches=2)),
    ("tp2", Layout(tp=2)),
    ("pp2+m4", Layout(pp=2, num_microbatches=4)),
    (" PP2+VPP2+m4 ", Layout(pp=2, vpp=2, num_microbatches=4)),
    ("cp2+dp2+m2", Layout(cp=2, dp=2, num_microbatches=2)),
    ("tp2+pp2+dp2+m8", Layout(tp=2, pp=2, dp=2, num_microbatches=8)),
])
def test_parse_layout(text, expected):
    layout = parse_layout(text)
    assert layout == expected
    assert parse_layout(str(layout)) == layout
    assert layout.world_size == expected.tp * expected.pp * expected.cp * expected.dp


@pytest.mark.parametrize("text,message", [
    ("xp2", "bad layout 'xp2'"),
    ("tp2+tp4", "sets tp more than once"),
    ("dp", "bad layout 'dp'"),
    ("vpp2+m4", "needs vpp >= 2 and pp >= 2"),
    ("tp0", "must be >= 1"),
])
def test_parse_layout_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_layout(text)


def test_max_rel_diff_is_relative_to_each_tensor_scale():
    ref = {"a": torch.tensor([2.0, -4.0]), "b": torch.tensor([0.0, 100.0])}
    got = {"a": torch.tensor([2.0, -4.2]), "b": torch.tensor([1.0, 100.0])}
    # a: 0.2 / 4 = 0.05; b: 1 / 100 = 0.01
    assert max_rel_diff(got, ref) == (pytest.approx(0.05), "a")
    with pytest.raises(KeyError, match="only in ref"):
        max_rel_diff({"a": got["a"]}, ref)
    with pytest.raises(ValueError, match="all zeros"):
        max_rel_diff({"z": torch.ones(2)}, {"z": torch.zeros(2)})


def worker_jobs(directory):
    """This module's share of the session's shared launches (``tests/conftest.py``)."""
    return [(1, WORKER, [directory / "n1", *SINGLE], 300), (2, WORKER, [directory / "n2", *TWO], 300),
            (4, WORKER, [directory / "n4", *FOUR], 400)]


@pytest.fixture(scope="module")
def single(shared_jobs):
    return _load(shared_jobs / "n1", SINGLE)


@pytest.fixture(scope="module")
def reference(single):
    item, result = single[0]
    assert item == "dp1+m1"
    return result


def _assert_matches_reference(results, ref):
    for item, res in results:
        rel, key = max_rel_diff(res["grads"], ref["grads"])
        assert rel <= TOL, f"{item}: gradient of {key} differs from dp1+m1 by {rel:.3e} relative"
        assert res["grad_norm"] == pytest.approx(ref["grad_norm"], rel=TOL), item
        assert res["loss"] == pytest.approx(ref["loss"], rel=TOL), item
        for key, value in ref["params"].items():
            assert torch.equal(res["params"][key], value), f"{item}: initial weights of {key} differ"


@pytest.mark.slow
def test_single_process_microbatching_and_determinism(single, reference):
    # Every tensor, the tied embedding included, receives a gradient.
    assert "embedding.word_embeddings.weight" in reference["grads"]
    assert all(g.abs().max() > 0 for g in reference["grads"].values())
    _assert_matches_reference([single[1]], reference)
    # Running the same layout twice in one process is bit-identical.
    item, repeat = single[2]
    assert item == "dp1+m1"
    assert all(torch.equal(repeat["grads"][k], g) for k, g in reference["grads"].items())


@pytest.mark.slow
def test_microbatch_mean_negative_control(single, reference):
    """The per-micro-batch token mean weights rows of short micro-batches more: a different gradient."""
    item, control = single[3]
    assert item == "dp1+m4:mbmean"
    rel, _ = max_rel_diff(control["grads"], reference["grads"])
    assert rel > 1e-2


@pytest.mark.slow
def test_two_process_layouts(reference, shared_jobs):
    _assert_matches_reference(_load(shared_jobs / "n2", TWO), reference)


@pytest.mark.slow
def test_four_process_layouts(reference, shared_jobs):
    _assert_matches_reference(_load(shared_jobs / "n4", FOUR), reference)
