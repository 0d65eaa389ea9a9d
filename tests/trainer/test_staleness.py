"""Per-token policy versions and --max-staleness: the reader, the up-front version check, the drop / mask
arithmetic and the staleness metrics (tiny, single process), and a real trainer run (3 steps on 2
processes, jobs of the session's shared launch) whose dropped / masked tokens, counts, metrics and policy
loss equal values computed from the file here."""

import json

import pytest
import torch

from megatron_rl_agg.core.aggregation import aggregate
from megatron_rl_agg.parallel.advantages import normalize_advantages
from megatron_rl_agg.trainer.cli.arguments import parse_args
from megatron_rl_agg.trainer.cli.validation import TrainerArgsError
from megatron_rl_agg.trainer.rollout import rollouts
from megatron_rl_agg.trainer.rollout.rollouts import RolloutFormatError
from megatron_rl_agg.trainer.rollout.sources import OfflineSource
from megatron_rl_agg.trainer.step import staleness
from trainer_helpers import MODEL_ARGS, trainer_job, trainer_results, write_rollouts


def _row(pid="a", response=(3, 4, 5), **extra):
    return {"prompt_id": pid, "prompt": [1, 2], "response": list(response), "reward": 1.0,
            "finish_reason": "stop", **extra}


def _write(tmp_path, rows):
    path = tmp_path / "v.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_versions_per_token_or_per_row(tmp_path):
    samples = rollouts.read_rollouts(_write(tmp_path, [_row(versions=[0, 2, 1]), _row(versions=3),
                                                       _row(response=(), versions=4), _row()]))
    assert [s.versions for s in samples] == [(0, 2, 1), (3, 3, 3), (), None]


@pytest.mark.parametrize("versions, message", [
    ([0, 1], "'versions' has 2 entries for 3 response tokens"),
    ([0, -1, 0], "'versions' must be >= 0 .* got -1"),
    (-2, "'versions' must be >= 0 .* got -2"),
    (True, "'versions' must be an int or a list of ints"),
    ([0, 1.0, 2], "'versions' must be an int or a list of ints"),
    ("1", "'versions' must be an int or a list of ints"),
])
def test_bad_versions_name_the_line_and_value(tmp_path, versions, message):
    path = _write(tmp_path, [_row(), _row(versions=versions)])
    with pytest.raises(RolloutFormatError, match=r"v\.jsonl:2: " + message):
        rollouts.read_rollouts(path)


def test_versions_on_some_lines_only_are_refused(tmp_path):
    path = _write(tmp_path, [_row(versions=0), _row("b")])
    with pytest.raises(RolloutFormatError, match=r"v\.jsonl:2: no 'versions', but other lines"):
        OfflineSource(path, global_batch_size=1, vocab_size=8)


def test_version_above_the_step_is_refused_before_step_1(tmp_path):
    """Mini-batch j of one row each is first used at step j + 1 (K = 1), which trains from version j; with
    K = 2 mini-batches 0, 1 are step 1's and 2, 3 step 2's."""
    rows = [_row("a", versions=0), _row("b", versions=[1, 0, 1]), _row("c", versions=[2, 1, 0]),
            _row("d", versions=[0, 3, 0])]
    path = _write(tmp_path, rows)
    source = OfflineSource(path, global_batch_size=1, vocab_size=8)
    source.check_versions(train_iters=4)                       # every version <= k - 1: accepted
    source.check_versions(train_iters=100)                     # later passes only grow the staleness
    rows[3]["versions"] = [0, 4, 0]                            # line 4, first used at step 4 (version 3)
    source = OfflineSource(_write(tmp_path, rows), global_batch_size=1, vocab_size=8)
    source.check_versions(train_iters=3)                       # step 4 is never run
    with pytest.raises(RolloutFormatError, match=r"v\.jsonl:4: policy version 4 is above 3, the version step 4"):
        source.check_versions(train_iters=4)
    rows[3]["versions"] = [0, 3, 0]
    two = OfflineSource(_write(tmp_path, rows), global_batch_size=1, vocab_size=8, mini_batches_per_step=2)
    with pytest.raises(RolloutFormatError, match=r"v\.jsonl:2: policy version 1 is above 0, the version step 1"):
        two.check_versions(train_iters=2)


@pytest.mark.parametrize("argv, message", [
    (["--max-staleness", "-1"], "--max-staleness must be an integer >= 0"),
    (["--staleness-mode", "mask"], "--staleness-mode mask needs --max-staleness"),
])
def test_bad_staleness_flags(tmp_path, argv, message):
    path = _write(tmp_path, [_row(versions=0)])
    with pytest.raises(TrainerArgsError, match=message):
        parse_args(["--rollouts", path, *argv])


def test_max_staleness_needs_rollouts():
    with pytest.raises(TrainerArgsError, match="--max-staleness 1 needs --rollouts with 'versions'"):
        parse_args(["--max-staleness", "1"])


# Two rows of S = 6 at step 4 (trains from version 3): row 0 has response tokens at 1..4 with versions
# 3, 2, 1, 0 (staleness 0, 1, 2, 3), row 1 at 0..1 with versions 3, 3 (staleness 0, 0).
VERSIONS = torch.tensor([[0, 3, 2, 1, 0, 0], [3, 3, 0, 0, 0, 0]])
MASK = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.float32)
ADV = torch.tensor([2.0, -1.0])


def test_drop_takes_stale_tokens_out_of_the_mask_and_counts_them():
    mask, adv, counts = staleness.apply_max_staleness(VERSIONS, MASK, ADV, step=4, max_staleness=1, mode="drop")
    assert mask.tolist() == [[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]       # staleness 2 and 3 dropped
    assert adv is ADV
    # 6 loss tokens, staleness 0, 1, 2, 3, 0, 0: sum 6, max 3, at 0: 3, at 1: 1, above 1: 2, beyond K: 2
    assert counts == {"staleness_tokens": 6, "staleness_sum": 6, "staleness_n0": 3, "staleness_n1": 1,
                      "staleness_ngt1": 2, "num_stale_tokens": 2, "staleness_max": 3}
    # token_mean over the survivors: (2 + 2 - 1 - 1) / 4
    assert aggregate(-adv.unsqueeze(1) * mask, mask, "token_mean").item() == pytest.approx(-0.5)


def test_mask_zeroes_the_advantage_and_keeps_the_denominator():
    mask, adv, counts = staleness.apply_max_staleness(VERSIONS, MASK, ADV, step=4, max_staleness=2, mode="mask")
    assert torch.equal(mask, MASK)                                          # still in every count
    assert adv.tolist() == [[2, 2, 2, 2, 0, 2], [-1, -1, -1, -1, -1, -1]]   # staleness 3 > 2: advantage 0
    assert counts["num_stale_tokens"] == 1
    # token_mean keeps all 6 tokens in the denominator: (2 + 2 + 2 + 0 - 1 - 1) / 6
    assert aggregate(-adv * mask, mask, "token_mean").item() == pytest.approx(-4 / 6)


def test_no_limit_reports_only_and_combine_is_exact_over_mini_batches():
    mask, adv, first = staleness.apply_max_staleness(VERSIONS, MASK, ADV, step=4, max_staleness=None, mode="drop")
    assert torch.equal(mask, MASK) and adv is ADV and first["num_stale_tokens"] == 0
    # a second mini-batch of the step: one token of staleness 0 (counts weigh it as 1 of 7 tokens)
    _, _, second = staleness.apply_max_staleness(torch.tensor([[3]]), torch.ones(1, 1), ADV[:1], step=4,
                                                 max_staleness=None, mode="drop")
    line = staleness.combine_staleness([first, second])
    assert line == {"staleness_mean": 6 / 7, "staleness_max": 3, "staleness_frac_0": 4 / 7,
                    "staleness_frac_1": 1 / 7, "staleness_frac_gt1": 2 / 7, "num_stale_tokens": 0}
    with pytest.raises(ValueError, match=r"staleness mode 'drip' is not one of \['drop', 'mask'\]"):
        staleness.apply_max_staleness(VERSIONS, MASK, ADV, step=4, max_staleness=1, mode="drip")


# ------------------------------------------------------------------------------------------------
# the trainer: 3 steps, 3 mini-batches of 8 rows (two groups of 4), --max-staleness 1
# ------------------------------------------------------------------------------------------------

GROUPS = [4] * 6
GBS = 8
K_MAX = 1
RUNS = {  # name -> (staleness mode, layout flags)
    "drop/dp2": ("drop", ["--micro-batch-size", "2"]),
    "mask/dp2": ("mask", ["--micro-batch-size", "2"]),
    "drop/cp2": ("drop", ["--micro-batch-size", "4", "--context-parallel-size", "2"]),
}


def _token_versions(i, row):
    """Step k = i // 8 + 1 uses row i (trains from version k - 1): per-token versions in 0..k-1 (staleness
    0..k-1), and a whole-row int on every fifth row."""
    newest = i // GBS
    if i % 5 == 0:
        return newest - (i % 3 if newest >= 2 else 0)
    return [(i + 2 * j) % (newest + 1) for j in range(len(row["response"]))]


def write_versioned_rollouts(path):
    rows = write_rollouts(path, GROUPS, seed=21)
    for i, row in enumerate(rows):
        row["versions"] = _token_versions(i, row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def worker_jobs(tmp):
    write_versioned_rollouts(tmp / "v.jsonl")
    plan = []
    for name, (mode, flags) in RUNS.items():
        plan.append({"name": name, "argv": [
            "--rollouts", str(tmp / "v.jsonl"), "--global-batch-size", str(GBS), "--train-iters", "3",
            "--loss-aggregation", "token_mean", "--max-response-length", "8", "--max-staleness", str(K_MAX),
            "--staleness-mode", mode, "--lr", "0", *MODEL_ARGS, *flags]})
    return [trainer_job(plan, 2, tmp, 120)]


def _expected(rows, step, mode):
    """Step ``step``'s staleness metrics and token_mean policy loss (ratio 1: the file has no log-probs, so
    the old log-probs are the detached current ones) from the file alone."""
    batch = rows[(step - 1) * GBS: step * GBS]
    adv = normalize_advantages(torch.tensor([r["reward"] for r in batch], dtype=torch.float64),
                               group_sizes=[4, 4], mean_level="group", std_level="group", eps=1e-6, unbiased=True)
    tokens, values, kept = [], [], []
    for r, a in zip(batch, adv.tolist()):
        versions = r["versions"] if isinstance(r["versions"], list) else [r["versions"]] * len(r["response"])
        for v in versions:
            s = (step - 1) - v
            tokens.append(s)
            kept.append(s <= K_MAX)
            values.append(-a if s <= K_MAX else 0.0)
    n = len(tokens)
    stale = n - sum(kept)
    loss = sum(values) / (sum(kept) if mode == "drop" else n)
    return {"staleness_mean": sum(tokens) / n, "staleness_max": max(tokens),
            "staleness_frac_0": tokens.count(0) / n, "staleness_frac_1": tokens.count(1) / n,
            "staleness_frac_gt1": sum(s > 1 for s in tokens) / n, "num_stale_tokens": stale,
            "num_tokens": n - stale if mode == "drop" else n}, loss


@pytest.mark.slow
def test_trainer_drops_or_masks_exactly_the_stale_tokens_of_the_file(shared_jobs):
    results = trainer_results(shared_jobs, 2)
    rows = [json.loads(line) for line in (shared_jobs / "v.jsonl").read_text().splitlines()]
    assert _expected(rows, 3, "drop")[0]["num_stale_tokens"] > 0       # step 3 has stale tokens
    for name, (mode, _) in RUNS.items():
        lines = results[name]
        assert len(lines) == 3, name
        for step, line in enumerate(lines, start=1):
            metrics, loss = _expected(rows, step, mode)
            for key, value in metrics.items():
                assert line[key] == pytest.approx(value, abs=1e-12), (name, step, key)
            assert line["policy_loss"] == pytest.approx(loss, rel=1e-6, abs=1e-7), (name, step)
    # the drop and the mask objectives differ where tokens are stale (step 3); --lr 0 keeps the initial
    # weights, so step 3's gradient is comparable across the layouts
    assert results["drop/dp2"][2]["policy_loss"] != pytest.approx(results["mask/dp2"][2]["policy_loss"])
    assert results["drop/dp2"][2]["grad_norm"] == pytest.approx(results["drop/cp2"][2]["grad_norm"], rel=1e-5)
