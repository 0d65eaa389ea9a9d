"""The plugin's loss function on real Megatron-Core (GPTModel fp32 with tied embeddings and RoPE, Megatron
DDP, the real schedules, gloo on CPU): the full gradient of every non-legacy aggregation mode after one
forward-backward is the same at (DP1, M1), (DP1, M4), (DP2, M2), (TP2), (PP2, M4), (PP2, VPP2, M4), and
under context parallelism at CP2, CP2 x DP2, CP2 x TP2 and CP2 x PP2, each CP layout also with
``calculate_per_token_loss=True`` (Megatron's 3-tuple contract; DP2 too). Every registered policy loss
runs in every mode it defines at M4, DP2, TP2, PP2, CP2, CP2 x DP2, CP2 with the flag and packed (THD) at
M4, PP2 and DP2 with the flag (``worker.POLICY_LAYOUTS``), from one model build per layout.

The global mini-batch (see ``worker_loss_invariance.py``) has unequal row lengths, a fully masked row and
prompt groups split across micro-batches and across DP ranks. Three launches cover every layout: one
process (``dp1+m1``, ``dp1+m4``), two processes and four processes (the rest). Differences are
``max|g - g_ref| / max|g_ref|`` per parameter tensor (``torchrun_utils.max_rel_diff``), against the
one-process, one-micro-batch run.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from torchrun_utils import load_result, max_rel_diff  # noqa: E402

pytestmark = pytest.mark.slow

WORKER_PATH = pathlib.Path(__file__).with_name("worker_loss_invariance.py")
_spec = importlib.util.spec_from_file_location("worker_loss_invariance", WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

TOL = 1e-5
EXACT = [m for m in worker.MODES if m != "token_mean_legacy"] + ["global_kl_entropy"] + list(worker.IS_CONFIGS)
REF_LAYOUT = "dp1+m1"
NPROCS = (1, 2, 4)


def worker_jobs(directory):
    """This module's share of the session's shared launches (``tests/conftest.py``): the worker
    runs the layouts of the launch's world size."""
    return [(nproc, WORKER_PATH, [directory / f"n{nproc}"], 400) for nproc in NPROCS]


@pytest.fixture(scope="module")
def runs(shared_jobs):
    """``{nproc: (out_dir,)}``."""
    return {nproc: (shared_jobs / f"n{nproc}",) for nproc in NPROCS}


def layouts(tag="pg"):
    table = worker.LAYOUTS if tag == "pg" else worker.KL_LAYOUTS
    return [(nproc, text, mbs) for nproc in NPROCS for text, mbs in table[nproc]]


def result(runs, nproc, tag, layout, config):
    return load_result(runs[nproc][0], f"{tag}-{layout}-{config}")


@pytest.mark.parametrize("config", EXACT)
def test_gradient_equal_at_every_layout(runs, config):
    ref = result(runs, 1, "pg", REF_LAYOUT, config)
    # Every tensor (tied embedding included) gets a gradient, so a layout that dropped one would show.
    assert all(g.abs().max() > 0 for g in ref["grads"].values())
    for nproc, layout, _ in layouts():
        rel, key = max_rel_diff(result(runs, nproc, "pg", layout, config)["grads"], ref["grads"])
        assert rel <= TOL, f"{config} at {layout}: {key} differs from {REF_LAYOUT} by {rel:.3e}"


@pytest.mark.parametrize("config", worker.MODES + ["global_kl_entropy"] + list(worker.IS_CONFIGS))
def test_reported_policy_loss_is_the_whole_batch_aggregate(runs, config):
    """policy_loss/sum, reduced over micro-batches and DP ranks, equals aggregate() of the whole batch
    (full-vocabulary log-probs from one forward pass); for the legacy mode at the layout's micro-batch
    size, the objective that mode actually optimizes."""
    ref = load_result(runs[1][0], "reference")
    for nproc, layout, mbs in layouts():
        metrics = result(runs, nproc, "pg", layout, config)["metrics"]
        expected = ref[f"{config}/mbs{mbs}/policy"]
        assert metrics["policy_loss/sum"] == pytest.approx(expected, rel=TOL, abs=1e-7), (layout, config)
        if config in worker.IS_CONFIGS:   # survivors: rejected / masked tokens left the loss mask
            assert metrics["num_tokens/sum"] == ref[f"{config}/counted"], (layout, config)
        else:
            assert metrics["num_tokens/sum"] == sum(worker.ROW_TOKENS)


def test_global_kl_and_entropy_terms_are_exact(runs):
    ref = load_result(runs[1][0], "reference")
    for nproc, layout, _ in layouts():
        metrics = result(runs, nproc, "pg", layout, "global_kl_entropy")["metrics"]
        assert metrics["kl_loss/sum"] == pytest.approx(ref["kl_token_mean"], rel=TOL), layout
        assert metrics["entropy_loss/sum"] == pytest.approx(ref["entropy_token_mean"], rel=TOL), layout
        # kl/mean and entropy/mean are true token means whatever the aggregation mode.
        assert metrics["kl/mean"] == pytest.approx(ref["kl_token_mean"], rel=TOL), layout
        assert metrics["entropy/mean"] == pytest.approx(ref["entropy_token_mean"], rel=TOL), layout


def test_both_clip_branches_are_exercised(runs):
    metrics = result(runs, 1, "pg", REF_LAYOUT, "token_mean")["metrics"]
    assert metrics["clip_frac/mean"] > 0.05 and metrics["dual_clip_frac/mean"] > 0


def test_legacy_differs_where_microbatch_token_counts_differ(runs):
    ref = result(runs, 1, "pg", REF_LAYOUT, "token_mean_legacy")
    # One micro-batch on one DP rank: the legacy mean is the global token mean.
    rel_tm, _ = max_rel_diff(ref["grads"], result(runs, 1, "pg", REF_LAYOUT, "token_mean")["grads"])
    assert rel_tm <= TOL
    for nproc, layout, mbs in layouts():
        rel, _ = max_rel_diff(result(runs, nproc, "pg", layout, "token_mean_legacy")["grads"], ref["grads"])
        if mbs == 8:      # tp2: still one micro-batch of all rows
            assert rel <= TOL, layout
        else:             # two rows per micro-batch: 11, 6, 12, 11 loss tokens
            assert rel > 1e-3, (layout, rel)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_and_entropy_gradient_does_not_grow_with_micro_batches(runs, estimator):
    """Default micro-batch-mean KL and entropy (advantages 0, so no policy gradient): with micro-batches of
    equal token counts the gradient at M = 4, at DP2 x M2 and at CP2 x M4 (flag off and on) equals the one
    at M = 1; a term multiplied by the micro-batch count (or not averaged over DP, or divided by a CP
    shard's token count instead of the whole micro-batch's) would be 4x (2x) larger."""
    ref = result(runs, 1, "kl", REF_LAYOUT, f"kl_{estimator}")
    assert max(g.abs().max() for g in ref["grads"].values()) > 1e-4
    for nproc, layout, _ in layouts("kl"):
        rel, key = max_rel_diff(result(runs, nproc, "kl", layout, f"kl_{estimator}")["grads"], ref["grads"])
        assert rel <= TOL, f"{estimator} at {layout}: {key} differs by {rel:.3e}"


def test_tp2_vocab_parallel_logprobs_and_entropy(runs):
    per_rank = load_result(runs[2][0], "tp2_vocab_parallel")["per_rank"]
    for r in per_rank:
        assert r["logprob_max_abs_diff"] < 1e-5 and r["entropy_max_abs_diff"] < 1e-5
        assert r["grad_max_abs_diff"] <= TOL * r["grad_scale"]
        assert r["labels_on_other_rank"] > 0    # some labels live in the other rank's vocab shard


def test_tp2_fused_logprobs_entropy_kernel(runs):
    """The fused kernel at TP2 vs the full-logit reference: fp32 and bf16 logits, entropy as a metric and
    with gradient, masked tokens, a row max on one rank only; 2 all-reduces forward, none backward."""
    per_rank = load_result(runs[2][0], "tp2_fused")["per_rank"]
    assert len(per_rank) == 2
    for r in per_rank:
        assert r["labels_on_other_rank"] > 0
        assert set(r["cases"]) == {"float32/metric", "float32/grad", "bfloat16/metric", "bfloat16/grad"}
        for name, c in r["cases"].items():
            # Forward values are fp32 whatever the logits' dtype (the reference upcasts the same logits).
            assert c["logprob_max_abs_diff"] < 1e-5 and c["entropy_max_abs_diff"] < 1e-5, name
            if name.startswith("float32"):
                assert c["grad_max_abs_diff"] <= TOL * c["grad_scale"], name
                assert c["grad_dtype"] == "torch.float32", name
            else:   # an fp32 gradient rounded once to bf16: within one bf16 step (2^-7 relative)
                assert c["grad_excess_over_bf16_step"] <= 1e-6, name
                assert c["grad_dtype"] == "torch.bfloat16", name
            assert c["masked_grad_max_abs"] == 0.0, name
            assert c["entropy_requires_grad"] == name.endswith("grad"), name
            assert (c["forward_all_reduces"], c["backward_all_reduces"]) == (2, 0), name


def test_context_parallel_and_per_token_loss_layouts_are_covered(runs):
    """The CP and calculate_per_token_loss layouts of the issue ran (flag off and on)."""
    texts = {text for _, text, _ in layouts()}
    for layout in ("cp2+m4", "cp2+dp2+m2", "cp2+tp2+m4", "cp2+pp2+m4"):
        assert layout in texts and f"{layout}:flag" in texts
    assert "dp2+m2:flag" in texts
    assert {"cp2+m4", "cp2+m4:flag"} <= {text for _, text, _ in layouts("kl")}


def policy_layouts():
    return [(nproc, text) for nproc in NPROCS for text, _ in worker.POLICY_LAYOUTS[nproc]]


def test_every_policy_loss_and_mode_is_covered():
    """Every registered loss x every issue mode it defines (ppo_clip through the "pg" configs), at M4, DP2,
    TP2, PP2, CP2, CP2 x DP2, CP2 with calculate_per_token_loss and packed (M4, PP2, DP2 with the flag)."""
    from megatron_rl_agg.core.policy_losses import POLICY_LOSSES

    defined = {f"{name}.{mode}" for name, loss in POLICY_LOSSES.items() if name != "ppo_clip"
               for mode in worker.POLICY_MODES if not (loss.level == "sequence" and mode == "seq_mean_token_sum_norm")}
    assert set(worker.POLICY_CONFIGS) == defined | {"gspo.seq_mean_token_mean_is"} and len(defined) == 25
    assert set(worker.POLICY_MODES) <= set(worker.MODES) and set(worker.PACKED_PG_MODES) == set(worker.POLICY_MODES)
    assert {text for _, text in policy_layouts()} == {
        "dp1+m1", "dp1+m4", "dp1+m4:packed", "dp2+m2", "tp2", "pp2+m4", "cp2+m4", "cp2+m4:flag",
        "pp2+m4:packed", "dp2+m2:flag,packed", "cp2+dp2+m2"}


@pytest.mark.parametrize("config", list(worker.POLICY_CONFIGS))
def test_every_policy_loss_gradient_equal_at_every_layout(runs, config):
    """Each registered loss x token_mean / seq_mean_token_mean / prompt_mean (and seq_mean_token_sum_norm
    for the token-level losses) at every policy layout, packed ones included: the gradient of the
    one-process, one-micro-batch padded run (rel 1e-5), and the reported policy loss equals the whole-batch
    objective from full-vocabulary log-probs."""
    ref = result(runs, 1, "pl", REF_LAYOUT, config)
    assert max(float(g.abs().max()) for g in ref["grads"].values()) > 0
    expected = load_result(runs[1][0], "reference")[f"pl/{config}"]
    if worker.POLICY_CONFIGS[config].is_level != "off":    # the correction masks some rows, not all
        assert 0 < load_result(runs[1][0], "reference")[f"pl/{config}/masked"] < sum(worker.ROW_TOKENS)
    for nproc, layout in policy_layouts():
        got = result(runs, nproc, "pl", layout, config)
        rel, key = max_rel_diff(got["grads"], ref["grads"])
        assert rel <= TOL, f"{config} at {layout}: {key} differs from {REF_LAYOUT} by {rel:.3e}"
        assert got["metrics"]["policy_loss/sum"] == pytest.approx(expected, rel=TOL, abs=1e-7), (layout, config)
        assert got["metrics"]["num_tokens/sum"] == sum(worker.ROW_TOKENS), (layout, config)


@pytest.mark.parametrize("mode", worker.PACKED_PG_MODES)
def test_packed_ppo_clip_gradient_equal(runs, mode):
    """The PPO surrogate (asymmetric and dual clip) with packed micro-batches: the padded one-process,
    one-micro-batch gradient and the whole-batch objective."""
    ref = result(runs, 1, "pg", REF_LAYOUT, mode)
    expected = load_result(runs[1][0], "reference")[f"{mode}/mbs8/policy"]
    packed = [(nproc, text) for nproc, text in policy_layouts() if "packed" in text]
    assert len(packed) == 3
    for nproc, layout in packed:
        got = result(runs, nproc, "pg", layout, mode)
        rel, key = max_rel_diff(got["grads"], ref["grads"])
        assert rel <= TOL, f"{mode} at {layout}: {key} differs from {REF_LAYOUT} by {rel:.3e}"
        assert got["metrics"]["policy_loss/sum"] == pytest.approx(expected, rel=TOL, abs=1e-7), (layout, mode)


@pytest.mark.parametrize("config", list(worker.IS_CONFIGS))
def test_off_policy_metrics_equal_at_every_layout(runs, config):
    """Behaviour log-probs that differ from the proximal ones: the correction's metrics (mismatch KL, IS
    weight mean / min / max, fractions) are exact over micro-batches, DP and CP ranks (equal to the
    one-process, one-micro-batch values), and the cases are not vacuous (weights moved, tokens dropped)."""
    ref = result(runs, 1, "pg", REF_LAYOUT, config)["metrics"]
    names = [n for n in ref if n.startswith(("is_", "mismatch_kl"))]
    assert len(names) == 9
    assert ref["mismatch_kl_k3/mean"] > 1e-3 and ref["is_weight/max"] > ref["is_weight/min"]
    dropped = load_result(runs[1][0], "reference")[f"{config}/rejected_or_masked"]
    frac = ref["is_masked_frac/mean"] + ref["is_rejected_frac/mean"]
    assert frac == pytest.approx(dropped / sum(worker.ROW_TOKENS), abs=1e-12)
    if worker.IS_CONFIGS[config].is_mode == "mask" or worker.IS_CONFIGS[config].is_veto:
        assert dropped > 0, config
    else:
        assert ref["is_truncated_frac/mean"] > 0, config
    for nproc, layout, _ in layouts():
        metrics = result(runs, nproc, "pg", layout, config)["metrics"]
        for n in names:
            assert metrics[n] == pytest.approx(ref[n], rel=1e-9, abs=1e-12), (layout, config, n)
