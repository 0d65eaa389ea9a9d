"""Save / resume with dist_checkpointing on real Megatron-Core (one 2-process torchrun launch).

* Resume: 4 uninterrupted on-policy steps vs 2 steps, save, resume for steps 3-4 (partial groups from
  lost samples, a KL term to the frozen reference): the resumed steps' metrics are the same numbers.
* On-policy generation at TP2, PP2, PP2 x VPP2 and CP2 samples what DP2 samples (same initial weights,
  counter-based sampling noise), so the first two steps' rollouts and losses agree with the DP2 run.
* Cross-layout load: a checkpoint saved at TP1/PP1 (DP2) after step 1 of an offline run, loaded at TP2,
  PP2, PP2 x VPP2 and CP2 (with --calculate-per-token-loss); step 2 there matches step 2 of the uninterrupted TP1/PP1 run. The file carries
  behaviour log-probs, so step 2's policy loss depends on the loaded logits (ratio != 1), as do its
  entropy and gradient norm.
"""

import json

import pytest

from trainer_helpers import MODEL_ARGS, torchrun, write_rollouts

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
# Compared exactly (up to float formatting); step_time_s is wall time.
SKIP = {"step_time_s"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    write_rollouts(tmp / "lp.jsonl", [4, 3, 4, 1, 2, 2], seed=11, with_logprobs=True)
    offline = [*MODEL_ARGS, "--rollouts", str(tmp / "lp.jsonl"), "--global-batch-size", "16",
               "--micro-batch-size", "4", "--loss-aggregation", "seq_mean_token_mean", "--lr", "3e-3",
               "--entropy-coef", "0.01"]
    ck1, ck2 = str(tmp / "ck_resume"), str(tmp / "ck_layout")
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
        {"name": "off_cp2", "argv": offline + ["--train-iters", "2", "--load", ck2,
                                               "--context-parallel-size", "2", "--calculate-per-token-loss"]},
    ]
    for name, flags in ON_POLICY_LAYOUTS.items():
        plan.append({"name": f"onp_{name}", "argv": ON_POLICY + ["--train-iters", "2"] + flags})
    return tmp, torchrun(plan, 2, tmp)


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
