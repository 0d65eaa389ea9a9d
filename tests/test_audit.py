"""The invariance audit (``megatron-rl-agg check-invariance``).

Fast tests: argument validation, the relative-difference measure, the table and the exit status, and the
audit's mini-batch (the layout grammar: tests/test_layout.py). Slow tests run the command end to end on real Megatron-Core
(torchrun, 2 processes, gloo): a clean run passes everywhere, and each injected bug produces FAIL exactly
in the layouts it can affect.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from megatron_rl_agg.audit.batch import make_batch
from megatron_rl_agg.audit.plan import AUDIT_BUGS
from megatron_rl_agg.audit.report import exit_status, format_table, relative_grad_diff
from megatron_rl_agg.cli import build_parser, main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# arguments: rejected before any process starts (exit status 2)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--layouts", "dp2+m3"], "not divisible by dp*m = 6"),
    (["--layouts", "pp2+vpp2+m3", "--batch-size", "12"], "multiple of pp = 2"),
    (["--layouts", "pp4"], "not divisible by pp*vpp = 4"),
    (["--layouts", "tp3"], "divisible by tp = 3"),
    (["--modes", "token_avg"], "unknown loss aggregation 'token_avg'"),
    (["--kl-aggregation", "token_mean_legacy"], "--kl-aggregation must be one of"),
    (["--inject-bug", "kl_times_microbatches", "--kl-coef", "0"], "needs --kl-coef > 0"),
    (["--tolerance", "0"], "--tolerance must be > 0"),
    (["--layouts", "cp2", "--seq-length", "30"], "--seq-length 30 is not divisible by 2 * cp = 4"),
    (["--layouts", "ep2"], "ep2 needs an MoE model; set --num-experts"),
    (["--layouts", "ep2", "--num-experts", "3"], "--num-experts 3 is not divisible by ep = 2"),
    (["--layouts", "ep2+dp2+m3", "--num-experts", "4"], "not divisible by dp*ep*m = 12"),
    (["--num-experts", "4", "--moe-router-topk", "5"], "moe_router_topk=5 must be between 1 and num_experts=4"),
    (["--layouts", "ep2+tp2", "--num-experts", "4", "--seq-length", "33"], "must be divisible by tp"),
    (["--layouts", "cp2", "--num-experts", "4"], "MoE with cp > 1 is not supported here"),
    (["--moe-routing-replay", "r2"], "--moe-routing-replay r2 needs an MoE model; set --num-experts"),
    (["--policy-loss", "gpso"], "unknown policy loss 'gpso'; valid: ppo_clip, gspo, gspo_token, gmpo"),
    (["--policy-loss", " , "], "--policy-loss: no loss given"),
    (["--policy-loss", "gspo", "--modes", "token_sum"], "--policy-loss gspo with --modes token_sum"),
    (["--policy-loss", "gmpo", "--modes", "token_mean_legacy", "seq_mean_token_sum"], "token_mean_legacy"),
    (["--inject-bug", "cp_shard_sequence_ratio"], "add one of gspo, gspo_token, gmpo to --policy-loss"),
    (["--policy-loss", "cispo", "--inject-bug", "cp_shard_sequence_ratio"], "(got cispo)"),
    (["--is-mode", "clip"], "--is-mode and --is-self-normalize need --is-level"),
    (["--is-self-normalize"], "--is-mode and --is-self-normalize need --is-level"),
    (["--inject-bug", "is_microbatch_normalization"], "it needs --is-level token, sequence or geometric"),
    (["--inject-bug", "is_microbatch_normalization", "--is-level", "token"], "and --is-self-normalize"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    extra = ["--num-layers", "6"] if argv[:2] == ["--layouts", "pp4"] else []
    assert main(["check-invariance", *argv, *extra]) == 2
    assert message in capsys.readouterr().err


def test_inject_bug_choices_are_the_documented_ones(capsys):
    assert AUDIT_BUGS == ("kl_times_microbatches", "local_token_count", "cp_token_count",
                          "cp_shard_sequence_ratio", "is_microbatch_normalization")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["check-invariance", "--inject-bug", "off_by_one"])
    assert "kl_times_microbatches" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# measure, table, exit status
# ----------------------------------------------------------------------------------------------

def test_relative_grad_diff_by_hand():
    ref = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5]), "z": torch.zeros(2)}
    got = {"a": torch.tensor([1.0, -2.2]), "b": torch.tensor([0.5]), "z": torch.zeros(2)}
    # a: max|diff| 0.2 over max|ref| 2 -> 0.1; b and z: 0.
    assert relative_grad_diff(got, ref) == (pytest.approx(0.1), "a")
    # An all-zero reference tensor is measured against the model's largest entry (2): 0.5 / 2.
    got["z"] = torch.tensor([0.0, 0.5])
    assert relative_grad_diff(got, ref) == (pytest.approx(0.25), "z")
    got["b"] = torch.tensor([float("nan")])
    assert relative_grad_diff(got, ref)[0] == float("inf")
    with pytest.raises(KeyError, match="only in reference"):
        relative_grad_diff({"a": ref["a"]}, ref)


def _result(mode, layout, rel, status):
    return {"policy_loss": "ppo_clip", "mode": mode, "layout": layout, "rel_diff": rel, "worst_param": "w", "status": status}


def test_table_and_exit_status():
    results = [_result("token_mean", "m4", 1e-7, "PASS"), _result("token_mean", "dp2+m2", 0.3, "FAIL"),
               _result("prompt_mean", "m4", 2e-7, "PASS"),
               dict(_result("seq_mean_token_mean", "m4", 4e-7, "PASS"), policy_loss="gspo_token")]
    pairs = [("ppo_clip", "token_mean"), ("ppo_clip", "prompt_mean"), ("gspo_token", "seq_mean_token_mean")]
    table = format_table(results, ["m4", "dp2+m2"], pairs, 1e-4, "local_token_count")
    assert "SELF-TEST" in table and "3 PASS, 1 FAIL" in table
    assert "FAIL ppo_clip token_mean @ dp2+m2: 3.000e-01 at w" in table
    row = next(line for line in table.splitlines() if line.startswith("ppo_clip    prompt_mean"))
    assert "2.0e-07 PASS" in row and row.rstrip().endswith("-")      # not run at dp2+m2
    row = next(line for line in table.splitlines() if line.startswith("gspo_token  seq_mean_token_mean"))
    assert "4.0e-07 PASS" in row and row.rstrip().endswith("-")
    assert exit_status(results) == 1
    assert exit_status(results[::2]) == 0
    assert exit_status([]) == 2


# ----------------------------------------------------------------------------------------------
# the audit's mini-batch exercises every count
# ----------------------------------------------------------------------------------------------

def test_default_batch_exercises_the_counts():
    args = build_parser().parse_args(["check-invariance"])
    batch = make_batch(batch_size=args.batch_size, seq_length=args.seq_length, vocab_size=args.vocab_size,
                       seed=args.seed)
    mask, gid = batch["loss_mask"], batch["group_ids"]
    rows = mask.sum(1)
    assert (rows == 0).any(), "a fully masked row"
    dead_groups = [g for g in gid.unique() if rows[gid == g].sum() == 0]
    live_groups_with_dead_row = [g for g in gid.unique()
                                 if (rows[gid == g] == 0).any() and rows[gid == g].sum()]
    assert dead_groups and live_groups_with_dead_row
    B = args.batch_size
    # A group continues across every dp2 / dp4 rank boundary (and the m2 / m4 micro-batch boundaries of
    # the default layouts), so prompt_mean must merge a group's counts across ranks.
    for cut in (B // 4, B // 2, 3 * B // 4):
        assert gid[cut - 1] == gid[cut], cut
    # Halves and quarters hold different token counts (a mean of means would differ from the mean).
    assert rows[: B // 2].sum() != rows[B // 2:].sum()
    assert len({int(rows[i:i + B // 4].sum()) for i in range(0, B, B // 4)}) > 1
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    assert sum(batch["group_sizes"]) == B


# ----------------------------------------------------------------------------------------------
# end to end on real Megatron-Core (2 processes)
# ----------------------------------------------------------------------------------------------

GLOBAL_COUNT_MODES = {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm",
                      "prompt_mean"}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    return env


def _audit(tmp_path, argv, *, torchrun_nproc=None):
    """Run the command (through torchrun when ``torchrun_nproc``); return (exit status, stdout, results)."""
    out = tmp_path / "audit.json"
    cli = ["-m", "megatron_rl_agg.cli", "check-invariance", *argv, "--json", str(out)]
    if torchrun_nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={torchrun_nproc}", *cli]
    else:
        cmd = [sys.executable, *cli]
    # A new session, so that a hung run is killed with all its torchrun workers, not torchrun alone.
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert out.exists(), f"no results (exit {proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return proc.returncode, stdout, json.loads(out.read_text())["results"]


def _status(results, loss="ppo_clip"):
    """``{(mode, layout): PASS/FAIL}`` of one policy loss's cells."""
    return {(r["mode"], r["layout"]): r["status"] for r in results if r["policy_loss"] == loss}


@pytest.mark.slow
def test_clean_run_passes_everywhere(tmp_path):
    # Policy losses beside ppo_clip: the sequence-level gspo / gmpo (per-row ratio reduced over CP at
    # cp2) skip the four modes they refuse (token_sum, seq_mean_token_sum(_norm), token_mean_legacy).
    code, stdout, results = _audit(tmp_path, ["--layouts", "dp2+m2 tp2+m2 pp2vpp2m4 cp2+m2",
                                              "--policy-loss", "ppo_clip,gspo", "geo_mean"])
    status = _status(results)
    assert set(status.values()) == {"PASS"} and len(status) == 7 * 4, stdout
    for loss, modes in (("gspo", 3), ("gmpo", 3)):
        cells = _status(results, loss)
        assert set(cells.values()) == {"PASS"} and len(cells) == modes * 4, (loss, stdout)
        assert ("seq_mean_token_mean", "cp2+m2") in cells
    assert code == 0
    assert "52 PASS, 0 FAIL" in stdout
    assert "not audited (refused by the loss configuration): gspo x token_sum" in stdout


@pytest.mark.slow
def test_moe_expert_parallel_layouts_pass(tmp_path):
    """An MoE model (4 experts, top-2) at EP2 on 2 processes: every mode PASSes against the reference."""
    argv = ["--layouts", "ep2+m2", "--num-experts", "4", "--num-layers", "2", "--modes", "token_mean",
            "seq_mean_token_sum_norm", "prompt_mean", "token_mean_legacy"]
    code, stdout, results = _audit(tmp_path, argv)
    status = _status(results)
    assert set(status.values()) == {"PASS"} and len(status) == 4, stdout
    assert code == 0


@pytest.mark.slow
def test_moe_routing_replay_r2_passes(tmp_path):
    """check-invariance --moe-routing-replay r2: the routes of the reference's forward are replayed in the
    reference and, sliced per layout, at EP2 and PP2: every cell PASSes (misaligned routes would route
    tokens to other experts than the reference's and fail)."""
    argv = ["--layouts", "ep2+m2 pp2+m2", "--num-experts", "4", "--num-layers", "2", "--modes", "token_mean",
            "--moe-routing-replay", "r2"]
    code, stdout, results = _audit(tmp_path, argv)
    status = _status(results)
    assert set(status.values()) == {"PASS"} and len(status) == 2, stdout
    assert code == 0


@pytest.mark.slow
def test_injected_kl_factor_fails_where_m_gt_1(tmp_path):
    # Launched by torchrun directly; tp2 has one micro-batch, where "times M" is the identity.
    argv = ["--layouts", "dp2+m2 tp2", "--inject-bug", "kl_times_microbatches"]
    code, stdout, results = _audit(tmp_path, argv, torchrun_nproc=2)
    status = _status(results)
    assert code != 0
    assert {k for k, s in status.items() if s == "FAIL"} == {(m, "dp2+m2") for m, _ in status}
    assert all(status[(m, "tp2")] == "PASS" for m, _ in status)


@pytest.mark.slow
def test_injected_local_count_fails_where_dp_gt_1(tmp_path):
    # token_sum has no count and token_mean_legacy uses micro-batch counts only: both stay PASS.
    argv = ["--layouts", "dp2+m2 pp2+m2", "--inject-bug", "local_token_count"]
    code, stdout, results = _audit(tmp_path, argv)
    status = _status(results)
    assert code == 1
    assert {k for k, s in status.items() if s == "FAIL"} == {(m, "dp2+m2") for m in GLOBAL_COUNT_MODES}
    assert "FAIL ppo_clip token_mean @ dp2+m2" in stdout and "SELF-TEST" in stdout


@pytest.mark.slow
def test_injected_cp_count_fails_where_cp_gt_1_under_the_per_token_flag(tmp_path):
    # Weights counted over dp x cp count every row twice at cp2; at dp2 the dp x cp group is the DP group.
    argv = ["--layouts", "cp2+m2 dp2+m2", "--inject-bug", "cp_token_count", "--calculate-per-token-loss"]
    code, stdout, results = _audit(tmp_path, argv, torchrun_nproc=2)
    status = _status(results)
    assert code == 1
    assert {k for k, s in status.items() if s == "FAIL"} == {(m, "cp2+m2") for m in GLOBAL_COUNT_MODES}
    assert "FAIL ppo_clip token_mean @ cp2+m2" in stdout and "SELF-TEST" in stdout


@pytest.mark.slow
def test_injected_cp_shard_sequence_ratio_fails_where_cp_gt_1(tmp_path):
    # GSPO's / GMPO's per-sequence ratio from the local CP shard only: wrong at cp2 for the sequence-level
    # losses; at dp2 the shard is the whole row, and cispo (token level) has no sequence ratio.
    argv = ["--layouts", "cp2+m2 dp2+m2", "--inject-bug", "cp_shard_sequence_ratio", "--policy-loss",
            "gspo,gmpo,cispo", "--modes", "token_mean", "seq_mean_token_mean"]
    code, stdout, results = _audit(tmp_path, argv)
    assert code == 1 and len(results) == 3 * 2 * 2, stdout
    failed = {(r["policy_loss"], r["mode"], r["layout"]) for r in results if r["status"] == "FAIL"}
    assert failed == {(loss, m, "cp2+m2") for loss in ("gspo", "gmpo")
                      for m in ("token_mean", "seq_mean_token_mean")}, stdout
    assert "FAIL gspo seq_mean_token_mean @ cp2+m2" in stdout and "SELF-TEST" in stdout


@pytest.mark.slow
def test_off_policy_correction_passes_at_dp_and_cp(tmp_path):
    """Behaviour log-probs 0.2 x N(0, 1) off the proximal ones, sequence-level weights (the product over
    each FULL row, one scalar per row reduced over the CP group) masked outside [0.8, 1.2] and
    self-normalized over the mini-batch: ppo_clip and gspo equal the reference at dp2 and cp2."""
    argv = ["--layouts", "dp2+m2 cp2+m2", "--policy-loss", "ppo_clip,gspo", "--modes", "token_mean",
            "seq_mean_token_mean", "--is-level", "sequence", "--is-mode", "mask", "--is-self-normalize"]
    code, stdout, results = _audit(tmp_path, argv)
    assert code == 0 and len(results) == 2 * 2 * 2 and {r["status"] for r in results} == {"PASS"}, stdout
    assert "off-policy correction: --is-level sequence --is-mode mask" in stdout


@pytest.mark.slow
def test_injected_microbatch_is_normalization_fails_where_m_gt_1(tmp_path):
    """The IS self-normalization over each micro-batch (slime's) instead of the mini-batch: one micro-batch
    is the mini-batch at m1 (PASS); at m4 every cell FAILs."""
    argv = ["--layouts", "m1 m4", "--modes", "token_mean", "seq_mean_token_mean", "--is-level", "token",
            "--is-mode", "truncate", "--is-self-normalize", "--inject-bug", "is_microbatch_normalization"]
    code, stdout, results = _audit(tmp_path, argv)
    status = _status(results)
    assert code == 1
    assert {k for k, s in status.items() if s == "FAIL"} == {(m, "m4") for m, _ in status}, stdout
    assert all(status[(m, "m1")] == "PASS" for m, _ in status) and "SELF-TEST" in stdout
