"""Save / resume with dist_checkpointing on real Megatron-Core (one job of the session's 2-process launch).

* Resume: 4 uninterrupted on-policy steps vs 2 steps, save, resume for steps 3-4 (partial groups from
  lost samples, a KL term to the frozen reference): the resumed steps' metrics are the same numbers.
* On-policy generation at TP2, PP2, PP2 x VPP2 and CP2 samples what DP2 samples (same initial weights,
  counter-based sampling noise), so the first two steps' rollouts and losses agree with the DP2 run.
* MoE: a checkpoint saved at DP2 loads at PP2 (step 2 matches the uninterrupted run); resuming across
  EP 1 <-> EP > 1 is refused before loading (megatron-core's optimizer state differs); on-policy
  generation, KL to the MoE reference and two mini-batches per step agree between EP1 and EP2.
* Cross-layout load: a checkpoint saved at TP1/PP1 (DP2) after step 1 of an offline run, loaded at TP2,
  PP2, PP2 x VPP2 and CP2 (with --calculate-per-token-loss); step 2 there matches step 2 of the uninterrupted TP1/PP1 run. The file carries
  behaviour log-probs, so step 2's policy loss depends on the loaded logits (ratio != 1), as do its
  entropy and gradient norm.
* Barrier: ``dist.barrier`` (every save and export waits on it) at CP2 returns on no rank before the
  late one arrived (``barrier_worker.py``, a second job of the same launch).
"""

import json
from pathlib import Path

import pytest

from trainer_helpers import MODEL_ARGS, trainer_job, trainer_results, write_rollouts

pytestmark = pytest.mark.slow

ON_POLICY = [*MODEL_ARGS, "--global-batch-size", "32", "--num-samples-per-prompt", "8",
             "--micro-batch-size", "4", "--rollout-failure-prob", "0.2", "--kl-coef", "0.05",
             "--entropy-coef", "0.01",
             # exact global KL / entropy aggregation, so every term is independent of the micro-batch split
             "--kl-aggregation", "token_mean", "--entropy-aggregation", "seq_mean_token_mean",
             "--loss-aggregation", "prompt_mean", "--lr", "3e-3"]
ON_POLICY_LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "vpp": ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    "cp2": ["--context-parallel-size", "2"],
}
# MoE (4 experts, top-2, aux loss on) at EP1 (DP2) and EP2 (DP2): the same four micro-batches per DP rank.
MOE = ["--num-experts", "4", "--moe-aux-loss-coeff", "0.05", "--disable-bias-linear"]
EP2 = ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]
TEMPERATURES = (0.5, 1.5)
POLICY_LOSSES = ("gspo", "gspo_token", "gmpo", "cispo", "sapo", "dppo_tv", "dppo_kl")
# Compared exactly (up to float formatting); step_time_s is wall time.
SKIP = {"step_time_s"}


def worker_jobs(tmp):
    """The runs, in order (resumes follow their saves), as one job of the session's shared launches
    (``tests/conftest.py``)."""
    write_rollouts(tmp / "lp.jsonl", [4, 3, 4, 1, 2, 2], seed=11, with_logprobs=True)
    offline = [*MODEL_ARGS, "--rollouts", str(tmp / "lp.jsonl"), "--global-batch-size", "16",
               "--micro-batch-size", "4", "--loss-aggregation", "seq_mean_token_mean", "--lr", "3e-3",
               "--entropy-coef", "0.01"]
    ck1, ck2, ck3 = str(tmp / "ck_resume"), str(tmp / "ck_layout"), str(tmp / "ck_moe")
    plan = [
        {"name": "full", "argv": ON_POLICY + ["--train-iters", "4",
                                              "--metrics-file", str(tmp / "full.jsonl")]},
        {"name": "first", "argv": ON_POLICY + ["--train-iters", "2", "--save", ck1,
                                               "--metrics-file", str(tmp / "resumed.jsonl")]},
        {"name": "resumed", "argv": ON_POLICY + ["--train-iters", "4", "--load", ck1,
                                                 "--metrics-file", str(tmp / "resumed.jsonl")]},
        {"name": "ref_load", "argv": ON_POLICY + ["--train-iters", "1", "--ref-load", ck1]},
        {"name": "off_save", "argv": offline + ["--train-iters", "1", "--save", ck2]},
        {"name": "off_full", "argv": offline + ["--train-iters", "2"]},
        {"name": "off_tp2", "argv": offline + ["--train-iters", "2", "--load", ck2,
                                               "--tensor-model-parallel-size", "2"]},
        {"name": "off_pp2", "argv": offline + ["--train-iters", "2", "--load", ck2,
                                               "--pipeline-model-parallel-size", "2"]},
        {"name": "off_vpp", "argv": offline + ["--train-iters", "2", "--load", ck2,
                                               "--pipeline-model-parallel-size", "2",
                                               "--num-layers-per-virtual-pipeline-stage", "1"]},
        # off-policy (the file's behaviour log-probs): a DPPO trust region tight enough to mask some tokens
        {"name": "off_dppo_tv", "argv": offline + ["--train-iters", "1", "--policy-loss", "dppo_tv",
                                                   "--dppo-tv-delta", "0.01"]},
        {"name": "off_cp2", "argv": offline + ["--train-iters", "2", "--load", ck2,
                                               "--context-parallel-size", "2", "--calculate-per-token-loss"]},
    ]
    for name, flags in ON_POLICY_LAYOUTS.items():
        plan.append({"name": f"onp_{name}", "argv": ON_POLICY + ["--train-iters", "2"] + flags})
    # Temperature: two mini-batches, so the second one's behaviour log-probs are recorded by the forward-only
    # pass before the update; lr 0 keeps the policy the sampling one, so every ratio of step 1 must be 1.
    for temp in TEMPERATURES:
        plan.append({"name": f"temp_{temp}", "argv": ON_POLICY + [
            "--train-iters", "1", "--mini-batches-per-step", "2", "--lr", "0", "--temperature", str(temp)]})
    # Every other policy loss, the same way at T = 0.7: step 1 on-policy has ratio 1 for each.
    for name in POLICY_LOSSES:
        plan.append({"name": f"loss_{name}", "argv": ON_POLICY + [
            "--train-iters", "1", "--mini-batches-per-step", "2", "--lr", "0", "--temperature", "0.7",
            "--policy-loss", name]})
    plan += [
        {"name": "moe_save", "argv": offline + MOE + ["--train-iters", "1", "--save", ck3]},
        {"name": "moe_full", "argv": offline + MOE + ["--train-iters", "2"]},
        {"name": "moe_pp2", "argv": offline + MOE + ["--train-iters", "2", "--load", ck3,
                                                     "--pipeline-model-parallel-size", "2"]},
    ]
    for name, flags in (("ep1", []), ("ep2", EP2)):
        plan.append({"name": f"moe_onp_{name}", "argv": ON_POLICY + MOE + flags + [
            "--train-iters", "2", "--mini-batches-per-step", "2", "--global-batch-size", "16"]})
    barrier_dir = tmp / "barrier"
    barrier_dir.mkdir()
    return [trainer_job(plan, 2, tmp, 600),
            (2, str(Path(__file__).with_name("barrier_worker.py")), [str(barrier_dir)], 30)]


@pytest.fixture(scope="module")
def runs(shared_jobs):
    return shared_jobs, trainer_results(shared_jobs, 2)


def test_resume_reproduces_uninterrupted_metrics(runs):
    tmp, results = runs
    full, first, resumed = results["full"], results["first"], results["resumed"]
    assert [m["step"] for m in resumed] == [3, 4]
    assert full[2]["num_failed_samples"] > 0 and full[2]["kl_loss"] != 0      # the setup exercises both
    for a, b in zip(full, first + resumed):
        assert a["step"] == b["step"]
        for key in set(a) - SKIP:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    # the resumed run appended to the metrics file of the interrupted one
    lines = [json.loads(x) for x in (tmp / "resumed.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]


@pytest.mark.parametrize("layout", ["off_tp2", "off_pp2", "off_vpp", "off_cp2"])
def test_checkpoint_loads_at_another_layout(runs, layout):
    _, results = runs
    assert [m["step"] for m in results[layout]] == [2]
    ref, got = results["off_full"][1], results[layout][0]
    assert ref["ppo_kl"] != 0                        # old log-probs from the file: step 2 reads the weights
    for key in ("policy_loss", "entropy", "entropy_loss", "loss", "ppo_kl", "clip_frac", "grad_norm"):
        assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), key


@pytest.mark.parametrize("layout", list(ON_POLICY_LAYOUTS))
def test_on_policy_generation_is_layout_independent(runs, layout):
    _, results = runs
    for ref, got in zip(results["full"][:2], results[f"onp_{layout}"]):
        for key in ("reward_mean", "num_truncated", "response_length", "num_failed_samples", "num_tokens",
                    "num_partial_groups"):
            assert got[key] == pytest.approx(ref[key], rel=1e-9), (ref["step"], key)
        for key in ("policy_loss", "kl_loss", "entropy", "grad_norm"):
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), (ref["step"], key)


@pytest.mark.parametrize("temp", TEMPERATURES)
def test_on_policy_ratio_is_one_at_any_temperature(runs, temp):
    """Rollouts drawn from softmax(z / T): the recorded behaviour log-probs and the reference's (KL 0 at
    step 1) equal the loss's, which are those of z / T as well (dropping T on either side fails this)."""
    _, results = runs
    (step,) = results[f"temp_{temp}"]
    assert abs(step["ppo_kl"]) < 1e-6
    assert step["clip_frac"] == 0.0
    assert step["kl_loss"] == pytest.approx(0.0, abs=1e-9)
    assert step["num_tokens"] > 0


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_every_policy_loss_has_ratio_one_on_policy(runs, name):
    """--policy-loss X --temperature 0.7: the step runs, and with the policy the sampling one (lr 0) the
    second mini-batch's recorded behaviour log-probs give ratio 1 (nothing clipped or masked)."""
    _, results = runs
    (step,) = results[f"loss_{name}"]
    assert abs(step["ppo_kl"]) < 1e-6 and step["clip_frac"] == 0.0 and step["masked_frac"] == 0.0
    assert step["num_tokens"] > 0 and step["grad_norm"] > 0


def test_dppo_masked_fraction_reaches_the_metrics_line(runs):
    """Off policy (the file's behaviour log-probs), a TV trust region of 0.01 masks some tokens but not all:
    the line's masked_frac is the loss function's fraction (the on-policy 0 above is not a missing value)."""
    _, results = runs
    (step,) = results["off_dppo_tv"]
    assert 0.0 < step["masked_frac"] < 1.0, step
    assert step["clip_frac"] == 0.0 and abs(step["ppo_kl"]) > 1e-3


def test_reference_policy_defaults_to_initial_weights_or_ref_load(runs):
    _, results = runs
    # step 1: the policy is the initial weights, so KL to the default reference is 0 token by token
    assert results["full"][0]["kl_loss"] == pytest.approx(0.0, abs=1e-9)
    # --ref-load: the reference is the checkpoint after step 2, a different policy
    ref_loaded = results["ref_load"][0]
    assert ref_loaded["kl_loss"] > 1e-4
    # the reference changes only the KL term: rollouts and policy term of step 1 are the same
    for key in ("reward_mean", "num_tokens", "policy_loss"):
        assert ref_loaded[key] == pytest.approx(results["full"][0][key], rel=1e-6, abs=1e-9), key


def test_moe_checkpoint_loads_at_another_layout(runs):
    """Expert weights and their optimizer state saved at DP2 load at PP2 (stages own other layers)."""
    _, results = runs
    ref, got = results["moe_full"][1], results["moe_pp2"][0]
    assert got["step"] == 2 and ref["ppo_kl"] != 0
    for key in ("policy_loss", "entropy", "ppo_kl", "clip_frac", "grad_norm", "load_balancing_loss"):
        assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), key


def test_moe_on_policy_with_two_mini_batches_is_expert_parallel_invariant(runs):
    """On-policy generation through the MoE model, KL to the frozen MoE reference, two updates per step
    (old log-probs before the first): EP2 reproduces EP1 step by step."""
    _, results = runs
    ep1, ep2 = results["moe_onp_ep1"], results["moe_onp_ep2"]
    assert len(ep1) == len(ep2) == 2 and ep1[1]["kl_loss"] != 0
    for a, b in zip(ep1, ep2):
        for key in ("reward_mean", "num_tokens", "policy_loss", "kl_loss", "entropy", "grad_norm",
                    "load_balancing_loss", "ppo_kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (a["step"], key)


def test_barrier_waits_for_context_parallel_peers(runs):
    """dist.barrier at CP2 (DP and model-parallel groups of one rank): the late rank's marker is on disk
    when either rank returns from it (tests/trainer/barrier_worker.py)."""
    tmp, _ = runs
    for rank in (0, 1):
        assert json.loads((tmp / "barrier" / f"seen_{rank}.json").read_text()) == ["arrived_0", "arrived_1"]


def test_moe_resume_across_ep1_and_ep2_is_refused(runs, tmp_path):
    from megatron_rl_agg.trainer.cli.arguments import parse_args
    from megatron_rl_agg.trainer.cli.validation import TrainerArgsError
    from megatron_rl_agg.trainer.loop.build import _check_resumable

    tmp, _ = runs
    args = parse_args([*MODEL_ARGS, *MOE, *EP2, "--load", str(tmp / "ck_moe")])
    with pytest.raises(TrainerArgsError, match="saved at expert-parallel size 1, this run has 2"):
        _check_resumable(args)
