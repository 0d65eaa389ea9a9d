"""End-to-end trainer on real Megatron-Core (torchrun + gloo): step-1 loss from the file alone, grad-norm
invariance across layouts, padding that changes nothing.

Two launches for the whole module: one of 2 processes (DP2, TP2, PP2, PP2 x VPP2, CP2 and CP2 / DP2 with
``--calculate-per-token-loss``, the per-overlong-policy runs and the MoE runs at EP1 / EP2) and one of 1
process (DP1 with 4 micro-batches, dense and MoE). Every mode runs at DP2 and DP1 x M4, and at three of
the other six layouts (``LAYOUT_MODES``). One more launch pair: the DP2 step as two nodes of one process
each (``scripts/launch.sh --nnodes 2``, c10d rendezvous on 127.0.0.1).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from megatron_rl_agg.parallel.advantages import normalize_advantages
from megatron_rl_agg.core.aggregation import LOSS_AGGREGATIONS, aggregate
from trainer_helpers import MODEL_ARGS, REPO, read_rollouts, trainer_job, trainer_results, write_rollouts

pytestmark = pytest.mark.slow

MODES = [m for m in LOSS_AGGREGATIONS if m != "token_mean_legacy"]
POLICIES = ("keep", "zero_advantage", "mask")
# 16 rows in one mini-batch: a full group, a partial one, a group whose rows are all truncated, a
# singleton and two pairs. On 2 DP ranks (8 rows each) group 2 (rows 7..10) straddles the ranks.
GROUPS = [4, 3, 4, 1, 2, 2]
HORIZON = 8
PACKED_MODES = ("token_mean", "prompt_mean")
# one mode per kind of count a padding row could disturb: tokens, live rows, live groups
PADDED_MODES = ("token_mean", "seq_mean_token_mean", "prompt_mean")
LAYOUTS = {  # name -> (nproc, flags); every layout runs 4 micro-batches of the 16 rows
    "dp2": (2, ["--micro-batch-size", "2"]),
    "tp2": (2, ["--micro-batch-size", "4", "--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--micro-batch-size", "4", "--pipeline-model-parallel-size", "2"]),
    "pp2vpp2": (2, ["--micro-batch-size", "4", "--pipeline-model-parallel-size", "2",
                    "--num-layers-per-virtual-pipeline-stage", "1"]),
    "dp1m4": (1, ["--micro-batch-size", "4"]),
    # context parallelism and Megatron's calculate_per_token_loss (3-tuple) contract
    "cp2": (2, ["--micro-batch-size", "4", "--context-parallel-size", "2"]),
    "cp2flag": (2, ["--micro-batch-size", "4", "--context-parallel-size", "2", "--calculate-per-token-loss"]),
    "dp2flag": (2, ["--micro-batch-size", "2", "--calculate-per-token-loss"]),
}
NEW_LAYOUTS = ("cp2", "cp2flag", "dp2flag")
# Every mode runs at dp2 (the file-aggregate checks) and dp1m4 (the grad-norm reference); each other
# layout runs three modes, so that every mode meets three of them (the loss-level tests in
# tests/megatron check every mode at every layout; these check the trainer's wiring of each layout).
LAYOUT_MODES = {
    "dp2": MODES, "dp1m4": MODES,
    "tp2": ["token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"],
    "pp2": ["token_mean", "seq_mean_token_sum", "prompt_mean"],
    "pp2vpp2": ["token_mean", "seq_mean_token_sum_norm", "prompt_mean"],
    "cp2": ["token_sum", "seq_mean_token_mean", "prompt_mean"],
    "cp2flag": ["token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"],
    "dp2flag": ["token_sum", "seq_mean_token_mean", "seq_mean_token_sum"],
}
# The sequence-level losses whose per-sequence ratio spans CP shards and TP's vocabulary split: step 1
# (on policy, T = 0.7) at three layouts, the paper's per-sequence mean.
SEQUENCE_LOSSES = ("gspo", "gmpo")
SEQUENCE_LOSS_LAYOUTS = ("dp2", "cp2", "tp2")
# the overlong policies, with one mode per kind of count a dropped row changes: tokens, rows, groups
POLICY_MODES = ("token_mean", "seq_mean_token_mean", "prompt_mean")
# MoE (4 experts, top-2, aux loss on): every layout cuts the 16 rows into the same four micro-batches of
# 4 rows (the aux loss is a per-micro-batch statistic), EP1 at DP1 and DP2, EP2 with both dispatchers,
# and EP2 with --calculate-per-token-loss (3-tuple; its routed-token count keeps the aux loss's scale).
MOE_FLAGS = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.05",
             "--disable-bias-linear", "--micro-batch-size", "4"]
MOE_LAYOUTS = {
    "dp1m4": (1, []),
    "dp2": (2, []),
    "ep2": (2, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]),
    "ep2/allgather": (2, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "allgather"]),
    "ep2/flag": (2, ["--expert-model-parallel-size", "2", "--calculate-per-token-loss"]),
    # routing replay R2: the routes of the old log-prob forward replayed in the update; on the step-1
    # weights they are the live routes, so the step equals the run without replay
    "dp1m4/r2": (1, ["--moe-routing-replay", "r2"]),
    "ep2/r2": (2, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
                   "--moe-routing-replay", "r2"]),
}


# Off-policy correction (--recompute-logprobs): the file's log-probs are the behaviour policy's. At init
# the model is near uniform (logp within a few 0.01 of -ln 32), so a token whose behaviour log-prob is
# -ln 32 - 2 has ratio pi_prox / pi_behave ~ e^2 = 7.4 (outside [0.5, 2]) and one at -ln 32 has ratio ~1:
# the truncated / masked tokens are known from the file alone.
IS_RUNS = {
    "token_truncate": ["--is-level", "token", "--is-mode", "truncate", "--is-high", "2.0"],
    "token_mask_survivors": ["--is-level", "token", "--is-mode", "mask", "--is-low", "0.5", "--is-high", "2.0",
                             "--is-denominator", "survivors", "--is-self-normalize"],
    "geometric_clip": ["--is-level", "geometric", "--is-mode", "clip", "--is-low", "0.5", "--is-high", "1.5",
                       "--is-self-normalize"],
}
IS_LAYOUTS = ("dp2", "cp2", "dp1m4")
IS_GROUPS = [4, 4, 4, 4]
LN_V = 3.4657359027997265        # ln 32


def _is_shifted(i, j):
    return (2 * i + j) % 3 == 0


def write_off_policy_rollouts(path):
    rows = write_rollouts(path, IS_GROUPS, seed=11)
    for i, row in enumerate(rows):
        row["logprobs"] = [-LN_V - (2.0 if _is_shifted(i, j) else 0.0) for j in range(len(row["response"]))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def write_routed_rollouts(path, out):
    """``path``'s rows with MoE routes (routing replay R3): random distinct top-2 of 4 experts for every
    token of prompt + response at each of the 4 layers of MODEL_ARGS."""
    import torch

    gen = torch.Generator().manual_seed(5)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        n = len(row["prompt"]) + len(row["response"])
        row["routes"] = torch.rand(n, 4, 4, generator=gen).argsort(-1)[..., :2].tolist()
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _argv(path, mode, extra=(), policy="keep", gbs=16):
    return ["--rollouts", str(path), "--global-batch-size", str(gbs), "--train-iters", "1",
            "--loss-aggregation", mode, "--max-response-length", str(HORIZON), "--overlong-policy", policy,
            *MODEL_ARGS, *extra]


def worker_jobs(tmp):
    """The runs, as two jobs of the session's shared launches (``tests/conftest.py``)."""
    write_rollouts(tmp / "r.jsonl", GROUPS, seed=3, truncated_groups={2})
    write_rollouts(tmp / "r10.jsonl", [3, 4, 3], seed=5)
    plan2, plan1 = [], []
    for name, (nproc, flags) in LAYOUTS.items():
        # token_mean_legacy: at the two reference layouts, whose micro-batch splits differ
        for mode in LAYOUT_MODES[name] + (["token_mean_legacy"] if name in ("dp2", "dp1m4") else []):
            (plan2 if nproc == 2 else plan1).append({"name": f"{mode}/{name}",
                                                     "argv": _argv(tmp / "r.jsonl", mode, flags)})
    for mode in POLICY_MODES:
        for policy in POLICIES[1:]:        # "keep" is the default: the dp2 layout run above
            plan2.append({"name": f"{mode}/dp2/{policy}",
                          "argv": _argv(tmp / "r.jsonl", mode, LAYOUTS["dp2"][1], policy)})
    for mode in PADDED_MODES:
        # 10 rows on 2 ranks: 5 each; micro-batches of 2 pad each rank to 6 rows, of 1 need no padding.
        for mbs in (1, 2):
            plan2.append({"name": f"{mode}/pad/mbs{mbs}",
                          "argv": _argv(tmp / "r10.jsonl", mode, ["--micro-batch-size", str(mbs)])})
    for mode in PACKED_MODES:
        for name in ("dp2", "pp2", "pp2vpp2"):
            plan2.append({"name": f"{mode}/{name}/packed",
                          "argv": _argv(tmp / "r.jsonl", mode, LAYOUTS[name][1] + ["--sequence-packing"])})
    for mode in PACKED_MODES:
        for name in ("dp2", "tp2", "pp2vpp2", "cp2"):
            flags = LAYOUTS[name][1] + ["--mini-batches-per-step", "2", "--lr", "1e-2"]
            plan2.append({"name": f"{mode}/{name}/k2", "argv": _argv(tmp / "r.jsonl", mode, flags, gbs=8)})
    write_off_policy_rollouts(tmp / "r_is.jsonl")
    for name in IS_LAYOUTS:
        nproc, flags = LAYOUTS[name]
        for key, is_flags in IS_RUNS.items():
            argv = _argv(tmp / "r_is.jsonl", "token_mean", flags + ["--recompute-logprobs", *is_flags])
            argv[argv.index("--train-iters") + 1] = "3"
            (plan2 if nproc == 2 else plan1).append({"name": f"is/{key}/{name}", "argv": argv})
    for loss in SEQUENCE_LOSSES:
        for name in SEQUENCE_LOSS_LAYOUTS:
            flags = LAYOUTS[name][1] + ["--policy-loss", loss, "--temperature", "0.7"]
            plan2.append({"name": f"{loss}/{name}", "argv": _argv(tmp / "r.jsonl", "seq_mean_token_mean", flags)})
    for name, (nproc, flags) in MOE_LAYOUTS.items():
        (plan2 if nproc == 2 else plan1).append({"name": f"moe/{name}",
                                                 "argv": _argv(tmp / "r.jsonl", "token_mean", MOE_FLAGS + flags)})
    write_routed_rollouts(tmp / "r.jsonl", tmp / "r3.jsonl")
    plan1.append({"name": "moe/r3", "argv": _argv(tmp / "r3.jsonl", "token_mean",
                                                  MOE_FLAGS + ["--moe-routing-replay", "r3"])})
    return [trainer_job(plan2, 2, tmp, 600), trainer_job(plan1, 1, tmp, 300)]


@pytest.fixture(scope="module")
def runs(shared_jobs):
    results = trainer_results(shared_jobs, 2)
    results.update(trainer_results(shared_jobs, 1))
    return read_rollouts(shared_jobs / "r.jsonl"), results


def _file_tensors(rows):
    """Rewards, truncation flags and a left-aligned response-token mask, straight from the file rows."""
    rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
    truncated = torch.tensor([r["finish_reason"] == "length" for r in rows])
    mask = torch.zeros(len(rows), HORIZON, dtype=torch.float64)
    for i, r in enumerate(rows):
        mask[i, : len(r["response"])] = 1.0
    return rewards, truncated, mask


def _expected_policy_loss(rows, mode, policy):
    """-sum(w * A) from the file alone: GRPO advantages (group mean / unbiased group std, eps 1e-6) over the
    rows the overlong policy keeps in the statistics, aggregated with the reference ``aggregate``.

    Policy semantics (docs/training.md): keep -> every row; zero_advantage -> truncated rows out of the
    statistics (A = 0) but in the loss; mask -> truncated rows out of both. A group left with no row in
    the statistics is dropped from the loss (min_valid_group_size = 1).
    """
    rewards, truncated, mask = _file_tensors(rows)
    in_stats = torch.ones_like(truncated) if policy == "keep" else ~truncated
    adv = normalize_advantages(rewards, group_sizes=GROUPS, valid=in_stats, mean_level="group",
                               std_level="group", eps=1e-6, unbiased=True)
    group_of_row = torch.repeat_interleave(torch.arange(len(GROUPS)), torch.tensor(GROUPS))
    group_alive = torch.tensor([bool(in_stats[group_of_row == g].any()) for g in range(len(GROUPS))])
    in_loss = group_alive[group_of_row] & (~truncated if policy == "mask" else torch.ones_like(truncated))
    loss_mask = mask * in_loss.unsqueeze(1)
    values = (-adv).unsqueeze(1).expand_as(mask)        # ratio 1 at step 1: per-token loss is -A
    return aggregate(values, loss_mask, mode, group_sizes=GROUPS, max_response_length=HORIZON).item()


@pytest.mark.parametrize("mode, policy", [(mode, "keep") for mode in MODES]
                         + [(mode, policy) for mode in POLICY_MODES for policy in POLICIES[1:]])
def test_step1_policy_loss_equals_file_aggregate(runs, mode, policy):
    rows, results = runs
    got = results[f"{mode}/dp2" if policy == "keep" else f"{mode}/dp2/{policy}"][0]["policy_loss"]
    # abs: A enters the loss in float32 (rounding ~6e-8 per unit advantage)
    assert got == pytest.approx(_expected_policy_loss(rows, mode, policy), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("layout, mode", [(name, mode) for name in NEW_LAYOUTS for mode in LAYOUT_MODES[name]])
def test_step1_policy_loss_under_context_parallelism_and_per_token_loss(runs, mode, layout):
    """At CP2 (rows split into zigzag shards, partial sums reduced over dp x cp), with and without
    calculate_per_token_loss, the step-1 policy loss is still -sum(w * A) of the file."""
    rows, results = runs
    line = results[f"{mode}/{layout}"][0]
    assert line["policy_loss"] == pytest.approx(_expected_policy_loss(rows, mode, "keep"), rel=1e-6, abs=1e-7)
    assert line["num_tokens"] == sum(len(r["response"]) for r in rows)


def test_overlong_policies_differ_on_this_file(runs):
    # Guard against a file on which the three policies coincide (the test above would then not
    # distinguish them): the all-truncated group 2 is dropped under zero_advantage and mask only.
    rows, _ = runs
    values = {p: _expected_policy_loss(rows, "token_mean", p) for p in POLICIES}
    assert len({round(v, 9) for v in values.values()}) == 3, values


@pytest.mark.parametrize("mode", MODES)
def test_step1_grad_norm_is_layout_invariant(runs, mode):
    _, results = runs
    names = [name for name in LAYOUTS if mode in LAYOUT_MODES[name]]
    assert len(names) == 5                       # dp2, dp1m4 and three others
    norms = {name: results[f"{mode}/{name}"][0]["grad_norm"] for name in names}
    ref = norms["dp1m4"]
    assert ref > 0
    for name, value in norms.items():
        assert value == pytest.approx(ref, rel=1e-4), norms
    losses = {name: results[f"{mode}/{name}"][0]["policy_loss"] for name in names}
    for value in losses.values():
        assert value == pytest.approx(losses["dp1m4"], rel=1e-5, abs=1e-7), losses


@pytest.mark.parametrize("loss", SEQUENCE_LOSSES)
def test_sequence_level_loss_step1_is_layout_invariant(runs, loss):
    """--policy-loss gspo / gmpo --temperature 0.7: step-1 grad_norm and policy loss agree across dp2, cp2
    (each row's mean log-ratio summed over the CP group) and tp2; on policy nothing is clipped or masked
    and the loss is -(1/G) sum_i A_i (every sequence ratio 1)."""
    rows, results = runs
    lines = {name: results[f"{loss}/{name}"][0] for name in SEQUENCE_LOSS_LAYOUTS}
    ref = lines["dp2"]
    assert ref["grad_norm"] > 0
    for name, line in lines.items():
        assert line["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), (name, lines)
        assert line["policy_loss"] == pytest.approx(_expected_policy_loss(rows, "seq_mean_token_mean", "keep"),
                                                    rel=1e-6, abs=1e-7), name
        assert abs(line["ppo_kl"]) < 1e-6 and line["clip_frac"] == 0.0 and line["masked_frac"] == 0.0, name


def test_legacy_mode_depends_on_the_micro_batch_split(runs):
    rows, results = runs
    rewards, _, mask = _file_tensors(rows)
    adv = normalize_advantages(rewards, group_sizes=GROUPS, eps=1e-6)
    values = (-adv).unsqueeze(1).expand_as(mask)
    # dp1m4: micro-batches of 4 consecutive rows; dp2: rank 0 holds rows 0-7, rank 1 rows 8-15, each in
    # micro-batches of 2, so the objective is the mean of the 8 two-row micro-batch token means.
    by4 = aggregate(values, mask, "token_mean_legacy", micro_batch_size=4).item()
    by2 = aggregate(values, mask, "token_mean_legacy", micro_batch_size=2).item()
    assert abs(by4 - by2) > 1e-3 * abs(by4)
    assert results["token_mean_legacy/dp1m4"][0]["policy_loss"] == pytest.approx(by4, rel=1e-6)
    assert results["token_mean_legacy/dp2"][0]["policy_loss"] == pytest.approx(by2, rel=1e-6)
    g4 = results["token_mean_legacy/dp1m4"][0]["grad_norm"]
    g2 = results["token_mean_legacy/dp2"][0]["grad_norm"]
    assert abs(g4 - g2) > 1e-3 * g4


@pytest.mark.parametrize("mode", PADDED_MODES)
def test_padded_step_equals_unpadded(runs, mode):
    _, results = runs
    padded, unpadded = results[f"{mode}/pad/mbs2"][0], results[f"{mode}/pad/mbs1"][0]
    for key in ("policy_loss", "grad_norm", "entropy", "num_tokens", "reward_mean", "num_groups"):
        assert padded[key] == pytest.approx(unpadded[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("layout", ["dp2", "pp2", "pp2vpp2"])
@pytest.mark.parametrize("mode", PACKED_MODES)
def test_sequence_packing_equals_padded(runs, mode, layout):
    _, results = runs
    packed, padded = results[f"{mode}/{layout}/packed"][0], results[f"{mode}/{layout}"][0]
    for key in ("policy_loss", "grad_norm", "entropy", "num_tokens"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("mode", PACKED_MODES)
def test_two_mini_batches_per_step_are_layout_invariant(runs, mode):
    # Groups [4, 3 | 4, 1, 2 | 2] in mini-batches of at most 8 rows: step 1 updates on rows 0-6, then on
    # rows 7-13 with old log-probs computed before the first update, so the second update sees ratio != 1.
    _, results = runs
    ref = results[f"{mode}/dp2/k2"][0]
    assert ref["num_rows"] == 14 and ref["num_groups"] == 5
    assert ref["ppo_kl"] != 0
    for name in ("tp2", "pp2vpp2", "cp2"):     # cp2: old log-probs gathered over the CP group
        got = results[f"{mode}/{name}/k2"][0]
        for key in ("policy_loss", "grad_norm", "entropy", "ppo_kl", "clip_frac"):
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), (name, key)


def test_metrics_lines_carry_every_documented_key(runs):
    from megatron_rl_agg.trainer.loop.reporting import METRIC_KEYS

    _, results = runs
    line = results["token_mean/dp2"][0]
    assert set(METRIC_KEYS) <= set(line)
    json.dumps(line)
    # the file: 6 groups, group 1 (3 of 4) and 3 (1 of 4) and 4, 5 (2 of 4) are partial against the
    # largest group of 4 rows
    assert line["num_groups"] == 6 and line["num_partial_groups"] == 4 and line["num_dropped_groups"] == 0
    rows, _ = runs
    assert line["num_truncated"] == sum(r["finish_reason"] == "length" for r in rows)
    assert line["num_tokens"] == sum(len(r["response"]) for r in rows)


def test_moe_step1_is_expert_parallel_invariant(runs):
    """MoE: step-1 grad_norm, policy_loss and the load-balancing loss agree between EP1 (DP1 x M4, DP2)
    and EP2 (both dispatchers, and with --calculate-per-token-loss), with and without --moe-routing-replay r2
    (whose old log-probs give ppo_kl 0 at step 1); the MoE model is really another model than the dense one."""
    rows, results = runs
    lines = {name: results[f"moe/{name}"][0] for name in MOE_LAYOUTS}
    ref = lines["dp1m4"]
    assert ref["grad_norm"] > 0 and ref["grad_norm"] != pytest.approx(results["token_mean/dp1m4"][0]["grad_norm"])
    assert 0.5 < ref["load_balancing_loss"] < 2.0        # near 1 for balanced routing at initialisation
    for name, line in lines.items():
        for key in ("grad_norm", "policy_loss", "load_balancing_loss", "entropy"):
            assert line[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (name, key)
    for name in ("dp1m4/r2", "ep2/r2"):
        assert abs(lines[name]["ppo_kl"]) < 1e-7, (name, lines[name]["ppo_kl"])
        # same weights: the live router would choose the replayed experts for every token
        assert lines[name]["routing_mismatch"] == 0 and "routing_mismatch_l3" in lines[name]
    assert "routing_mismatch" not in ref
    # R3: the file's routes (random, not the live router's) are replayed: the same rows and loss (ratio 1 on
    # policy), another gradient
    r3 = results["moe/r3"][0]
    assert r3["policy_loss"] == pytest.approx(ref["policy_loss"], rel=1e-6) and r3["ppo_kl"] == 0
    assert abs(r3["grad_norm"] / ref["grad_norm"] - 1) > 1e-3, (r3["grad_norm"], ref["grad_norm"])
    assert 0.3 < r3["routing_mismatch"] < 1        # random routes: mostly not the live router's choice
    assert ref["policy_loss"] == pytest.approx(_expected_policy_loss(rows, "token_mean", "keep"), rel=1e-6,
                                               abs=1e-7)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(tmp_path, name, launcher_flags, trainer_argv):
    """Start ``bash scripts/launch.sh LAUNCHER_FLAGS TRAINER_ARGV`` in its own process group, output to
    ``tmp_path / name.log`` (a file, not a pipe: a full pipe would stall a rank inside a collective)."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / f"{name}.log", "w", encoding="utf-8")
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "launch.sh"), *launcher_flags, *trainer_argv],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return proc


def test_two_node_launch_equals_single_node_dp2(runs, shared_jobs, tmp_path):
    """Multi-node, on one machine: two ``scripts/launch.sh`` invocations, ``--nnodes 2 --node-rank 0/1``,
    one process each, meeting in torchrun's c10d rendezvous on 127.0.0.1 (gloo), run one trainer step of
    the dp2 config; its grad_norm and policy loss are those of the single-node DP2 run (same rows on the
    same two ranks). Both launches are killed (their whole process groups) on a timeout or a failure."""
    _, results = runs
    metrics = tmp_path / "metrics.jsonl"
    argv = _argv(shared_jobs / "r.jsonl", "token_mean", LAYOUTS["dp2"][1]) + ["--metrics-file", str(metrics)]
    port, seconds = _free_port(), 300
    procs = [_launch(tmp_path, f"node{rank}", ["--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node",
                                                "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                                                "--rdzv-backend", "c10d", "--rdzv-id", "two-node-test"],
                     argv) for rank in (0, 1)]
    deadline = time.monotonic() + seconds
    try:
        codes = [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    logs = {rank: (tmp_path / f"node{rank}.log").read_text(errors="replace")[-3000:] for rank in (0, 1)}
    assert codes == [0, 0], f"two-node launch: exit codes {codes} (None: timed out after {seconds} s)\n{logs}"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["step"] == 1
    single = results["token_mean/dp2"][0]
    assert single["grad_norm"] > 0
    for key in ("grad_norm", "policy_loss", "entropy", "num_tokens", "num_rows"):
        assert lines[0][key] == single[key], (key, lines[0][key], single[key])


def test_launch_script_refuses_bad_launcher_options():
    """Usage errors of scripts/launch.sh, before torchrun starts (exit 2, the value and the valid range)."""
    cases = [(["--nnodes", "2", "--node-rank", "2"], "--node-rank must be an integer in [0, 2) for --nnodes 2, "
                                                    "got '2'"),
             (["--nnodes", "0"], "--nnodes must be a positive integer, got '0'"),
             (["--rdzv-backend", "etcd"], "--rdzv-backend must be one of: c10d, static; got 'etcd'"),
             (["--master-port", "70000"], "--master-port must be a port number (1-65535), got '70000'"),
             (["--nproc-per-node"], "--nproc-per-node needs a value")]
    for flags, message in cases:
        done = subprocess.run(["bash", str(REPO / "scripts" / "launch.sh"), *flags], cwd=REPO,
                              capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PYTHON": "/nonexistent/python"})
        assert done.returncode == 2 and message in done.stderr, (flags, done.returncode, done.stderr)


def _is_runs(results):
    return {(key, name): results[f"is/{key}/{name}"] for key in IS_RUNS for name in IS_LAYOUTS}


def test_off_policy_metrics_equal_the_file_and_agree_across_layouts(runs, shared_jobs):
    """--recompute-logprobs with each correction, 3 steps at dp2, cp2 and dp1 x m4: step 1's truncated /
    masked fractions equal the count of shifted behaviour log-probs in the file; the mismatch KL k1 is
    the file's mean shift up to the near-uniform model's deviation from -ln V; every metric of step 1
    (grad_norm included) agrees across the layouts."""
    _, results = runs
    rows = read_rollouts(shared_jobs / "r_is.jsonl")
    shifted = sum(_is_shifted(i, j) for i, r in enumerate(rows) for j in range(len(r["response"])))
    total = sum(len(r["response"]) for r in rows)
    assert 0 < shifted < total
    got = _is_runs(results)
    for (key, name), lines in got.items():
        assert len(lines) == 3, (key, name)
        first = lines[0]
        if key == "token_truncate":
            assert first["is_truncated_frac"] == pytest.approx(shifted / total, abs=1e-12), name
            assert first["is_weight_max"] == 2.0 and first["is_masked_frac"] == 0
        elif key == "token_mask_survivors":
            assert first["is_masked_frac"] == pytest.approx(shifted / total, abs=1e-12), name
            assert first["num_tokens"] == total - shifted          # survivors leave the loss mask
        # k1 = mean(logp_behave - logp_prox) = -2 * shifted / total + (ln V + mean logp_prox) ~ 0
        assert first["mismatch_kl_k1"] == pytest.approx(-2.0 * shifted / total, abs=0.05), (key, name)
        assert first["mismatch_kl_k3"] > 0.1
        ref = got[(key, "dp1m4")][0]
        for metric in ("grad_norm", "policy_loss", "mismatch_kl_k1", "mismatch_kl_k3", "is_weight_mean",
                       "is_weight_max", "is_weight_min", "is_truncated_frac", "is_masked_frac"):
            assert first[metric] == pytest.approx(ref[metric], rel=1e-5, abs=1e-9), (key, name, metric)
