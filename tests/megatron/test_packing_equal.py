"""Real Megatron-Core on CPU/gloo: packed (THD) micro-batches give the loss, the full gradients and the
per-token log-probs of padded micro-batches, at TP1, TP2, PP2 and PP2+VPP2, for token_mean and
seq_mean_token_mean (PPO surrogate + k3 KL + entropy bonus, unequal row lengths, a fully masked row).

The worker (``worker_packing.py``) runs both layouts of one mini-batch through the same model and the
unchanged ``megatron_loss.loss_func``. Tolerances (fp32; the two layouts differ only in the order of
floating-point sums, e.g. weight gradients sum over 35 packed tokens vs 64 padded positions):

- gradients, per tensor: ``||g_packed - g_padded|| / ||g_padded|| <= 1e-6`` (measured <= 5.0e-7;
  ``max|diff| / max|g|`` measured <= 9.2e-7);
- every reported loss term (policy, KL, entropy totals) relative 1e-6 (measured <= 3.4e-7); the total
  objective to 1e-6 of the sum of its terms' magnitudes, since the entropy bonus nearly cancels the
  other terms (0.0716 + 0.05 * 0.0466 - 0.01 * 4.15 = 0.0324);
- log-probs of the labels at every kept position relative 1e-6 (measured <= 1.2e-7).

A negative control (the packs as one attention segment, so rows see each other) must miss by > 1e-2.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from torchrun_utils import load_result, max_rel_diff  # noqa: E402

pytestmark = pytest.mark.slow

WORKER = pathlib.Path(__file__).with_name("worker_packing.py")
MODES = ("token_mean", "seq_mean_token_mean", "gspo.seq_mean_token_mean", "token_mean+is",
         "gspo.seq_mean_token_mean+is")   # worker_packing.MODES (+is: with the off-policy correction)
TOL = 1e-6
SINGLE = ["tp1", "tp1:abs"]
TWO = ["tp2", "pp2:abs", "pp2+vpp2:fixed"]


def _load(directory, items):
    return {item: load_result(directory, f"{index:02d}-{item}") for index, item in enumerate(items)}


def worker_jobs(directory):
    """This module's share of the session's shared launches (``tests/conftest.py``)."""
    return [(1, WORKER, [directory / "n1", *SINGLE], 300), (2, WORKER, [directory / "n2", *TWO], 300)]


@pytest.fixture(scope="module")
def single(shared_jobs):
    return _load(shared_jobs / "n1", SINGLE)


@pytest.fixture(scope="module")
def two(shared_jobs):
    return _load(shared_jobs / "n2", TWO)


def _norm_rel(got: dict, ref: dict) -> tuple[float, str]:
    """Largest per-tensor ``||got - ref|| / ||ref||`` and its key."""
    assert got.keys() == ref.keys()
    return max((((got[k].double() - ref[k].double()).norm() / ref[k].double().norm()).item(), k)
               for k in ref)


def _assert_packed_equals_padded(item, result, kl_coef=0.05, entropy_coef=0.01):
    for mode in MODES:
        r = result[mode]
        # 71 kept tokens in two packs instead of 2 x 4 x 16 padded positions (":fixed": both 36)
        assert r["packed_lengths"] == ([36, 36] if item.endswith(":fixed") else [35, 36]), (item, mode)
        assert all(g.abs().max() > 0 for g in r["grads_padded"].values()), (item, mode)
        rel, key = _norm_rel(r["grads_packed"], r["grads_padded"])
        assert rel <= TOL, f"{item} {mode}: packed gradient of {key} differs by {rel:.3e} relative"
        pad, pack = r["terms_padded"], r["terms_packed"]
        for term in ("policy_loss/sum", "kl_loss/sum", "entropy_loss/sum"):
            assert pack[term] == pytest.approx(pad[term], rel=TOL, abs=0), (item, mode, term)
        magnitude = abs(pad["policy_loss/sum"]) + kl_coef * abs(pad["kl_loss/sum"]) \
            + entropy_coef * abs(pad["entropy_loss/sum"])
        assert abs(pack["loss/sum"] - pad["loss/sum"]) <= TOL * magnitude, (item, mode)
        kept = r["kept"]
        assert kept.sum() == 71 and r["logp_padded"].shape == kept.shape
        torch.testing.assert_close(r["logp_packed"][kept], r["logp_padded"][kept], rtol=TOL, atol=0)
        assert torch.all(r["logp_packed"][~kept] == 0)
    control, _ = _norm_rel(result[MODES[0]]["grads_control"], result[MODES[0]]["grads_padded"])
    assert control > 1e-2, f"{item}: the one-segment control matched the padded gradient ({control:.3e})"


def test_packed_equals_padded_single_process(single):
    for item, result in single.items():
        _assert_packed_equals_padded(item, result)
        for mode in ("token_mean", "gspo.seq_mean_token_mean"):     # the correction changes the objective
            plain, corrected = result[mode]["terms_padded"], result[mode + "+is"]["terms_padded"]
            assert abs(corrected["policy_loss/sum"] - plain["policy_loss/sum"]) > 1e-3, (item, mode)


def test_packed_equals_padded_tp2_pp2_vpp2(two, single):
    for item, result in two.items():
        _assert_packed_equals_padded(item, result)
    # Layout-independent weights: the packed runs also agree with the one-process packed runs.
    for item, ref in (("tp2", "tp1"), ("pp2:abs", "tp1:abs"), ("pp2+vpp2:fixed", "tp1")):
        for mode in MODES:
            rel, key = max_rel_diff(two[item][mode]["grads_packed"], single[ref][mode]["grads_packed"])
            assert rel <= 1e-5, f"{item} vs {ref} {mode}: packed gradient of {key} differs by {rel:.3e}"
