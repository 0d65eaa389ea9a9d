"""Off-policy correction through prepare_microbatches + loss_func in one process (real parallel_state and
Megatron kernels): decoupled PPO equals plain PPO bit for bit when behaviour == proximal, and with a
known shift the weights, the gradient and the metrics equal a float64 reference written from the
formulas (docs/off_policy.md), whatever the micro-batch split."""

import math
import types

import pytest
import torch

from megatron_rl_agg.core.aggregation import aggregate
from megatron_rl_agg.core.config import LossConfig
from megatron_rl_agg.core.logits import logprobs_from_logits
from megatron_rl_agg.core.policy_losses import ppo_clipped_surrogate
from megatron_rl_agg.mcore import compat
from megatron_rl_agg.parallel.metrics import reduce_metrics

B, S, V = 7, 6, 11
GROUP_SIZES = [3, 2, 2]
ROW_TOKENS = [5, 2, 0, 4, 1, 3, 5]


@pytest.fixture(scope="module")
def megatron_loss():
    compat.initialize_distributed()
    compat.initialize_model_parallel(tp=1, pp=1)
    from megatron_rl_agg.mcore import batch, loss
    yield types.SimpleNamespace(prepare_microbatches=batch.prepare_microbatches, loss_func=loss.loss_func)
    compat.destroy_model_parallel()


def make_batch(seed=0, shift=0.4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, S)
    for i, k in enumerate(ROW_TOKENS):
        mask[i, S - 1 - k: S - 1] = 1
    logits = torch.randn(B, S, V, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    cur = logprobs_from_logits(logits, labels)
    old = (cur + 0.3 * torch.randn(B, S, generator=g)).clamp(max=-1e-3)
    behave = (old + shift * torch.randn(B, S, generator=g)).clamp(max=-1e-3)
    batch = dict(tokens=torch.randint(0, V, (B, S), generator=g), labels=labels, loss_mask=mask,
                 advantages=torch.randn(B, generator=g), old_logprobs=old, behaviour_logprobs=behave,
                 group_ids=torch.repeat_interleave(torch.arange(3), torch.tensor(GROUP_SIZES)))
    return logits, batch


def run(module, logits, batch, cfg, mbs_size):
    logits = logits.clone().requires_grad_(True)
    mbs = module.prepare_microbatches(batch, cfg, mbs_size)
    total, reports = 0.0, []
    for k, mb in enumerate(mbs):
        rows = logits[k * mbs_size:(k + 1) * mbs_size]
        rows = torch.cat([rows, torch.zeros(mbs_size - rows.shape[0], S, V)])
        loss, report = module.loss_func(rows * 1.0, micro_batch=mb, loss_config=cfg)
        total = total + loss / len(mbs)
        reports.append(report)
    total.backward()
    return total.detach(), logits.grad, reduce_metrics(reports), mbs


def reference_weights(batch, cfg):
    """IS weights and the counted mask in float64, from the formulas (independent of core.corrections)."""
    mask = batch["loss_mask"].double()
    d = (batch["old_logprobs"].double() - batch["behaviour_logprobs"].double()) * mask
    if cfg.is_level == "token":
        logw = d
    elif cfg.is_level == "sequence":
        logw = d.sum(1, keepdim=True).expand(B, S)
    else:
        logw = (d.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)).expand(B, S)
    r = logw.clamp(-20, 20).exp()
    dropped = torch.zeros(B, S, dtype=torch.bool)
    if cfg.is_mode == "truncate":
        r = torch.minimum(r, torch.tensor(cfg.is_high, dtype=torch.float64))
    elif cfg.is_mode == "clip":
        r = r.clamp(cfg.is_low, cfg.is_high)
    else:
        dropped = (r < cfg.is_low) | (r > cfg.is_high)
        r = torch.where(dropped, 0.0, r)
    if cfg.is_veto is not None:
        bad = ((d.exp() < cfg.is_veto) | (d.exp() > 1 / cfg.is_veto)) & (mask > 0)
        rej = bad.any(1, keepdim=True).expand(B, S)
        r, dropped = torch.where(rej, 0.0, r), dropped | rej
    r = r * mask
    counted = mask if cfg.is_denominator == "keep_count" else mask * ~dropped
    if cfg.is_self_normalize:
        r = r * counted.sum() / (r * counted).sum()
    return r, counted, d, dropped & (mask > 0)


def reference(logits, batch, cfg, w, counted):
    logits = logits.double().clone().requires_grad_(True)
    logp = logprobs_from_logits(logits, batch["labels"])
    pg, _, _ = ppo_clipped_surrogate(logp, batch["old_logprobs"].double(), batch["advantages"].double(),
                                     clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high)
    J = aggregate(pg * w, counted, cfg.loss_aggregation, group_sizes=GROUP_SIZES, max_response_length=S)
    J.backward()
    return J.detach(), logits.grad


CASES = [
    LossConfig(loss_aggregation="token_mean", is_level="token", is_mode="truncate", is_high=1.5),
    LossConfig(loss_aggregation="seq_mean_token_mean", is_level="geometric", is_mode="mask", is_low=0.8,
               is_high=1.25, is_denominator="survivors"),
    LossConfig(loss_aggregation="prompt_mean", is_level="sequence", is_mode="clip", is_low=0.5, is_high=2.0,
               is_veto=0.2, is_self_normalize=True),
    LossConfig(loss_aggregation="token_sum", is_level="token", is_mode="mask", is_low=0.7, is_high=1.4,
               is_self_normalize=True, is_denominator="survivors"),
    LossConfig(loss_aggregation="seq_mean_token_sum_norm", max_response_length=S, is_level="geometric",
               is_mode="truncate", is_high=1.1, is_veto=0.1, is_denominator="survivors",
               is_self_normalize=True),
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.is_level}-{c.is_mode}-{c.is_denominator}-"
                                                     f"{'sn' if c.is_self_normalize else 'raw'}")
@pytest.mark.parametrize("mbs_size", [7, 3, 2])
def test_weights_gradient_and_metrics_equal_float64_reference(megatron_loss, cfg, mbs_size):
    logits, batch = make_batch()
    loss, grad, metrics, mbs = run(megatron_loss, logits, batch, cfg, mbs_size)
    w, counted, d, dropped = reference_weights(batch, cfg)
    got_w = torch.cat([mb["is_weights"] for mb in mbs])[:B]
    torch.testing.assert_close(got_w, w, rtol=1e-12, atol=1e-15)
    ref_loss, ref_grad = reference(logits, batch, cfg, w, counted)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    assert ref_grad.abs().max() > 1e-3
    assert metrics["policy_loss/sum"] == pytest.approx(float(ref_loss), rel=1e-5)
    m = batch["loss_mask"].bool()
    n = m.sum()
    assert metrics["is_weight/mean"] == pytest.approx(float(w[m].sum() / n), rel=1e-12)
    assert metrics["is_weight/max"] == pytest.approx(float(w[m].max()), rel=1e-12)
    assert metrics["is_weight/min"] == pytest.approx(float(w[m].min()), rel=1e-12, abs=1e-300)
    assert metrics["mismatch_kl_k1/mean"] == pytest.approx(float(-d[m].sum() / n), rel=1e-12)
    assert metrics["mismatch_kl_k3/mean"] == pytest.approx(float((d.exp() - 1 - d)[m].sum() / n), rel=1e-10)
    assert metrics["is_masked_frac/mean"] + metrics["is_rejected_frac/mean"] == pytest.approx(
        float(dropped.sum() / n.double()), abs=1e-15)
    assert metrics["num_tokens/sum"] == (counted > 0).sum()       # survivors leave the loss mask


def test_cases_exercise_every_treatment(megatron_loss):
    # the reference test above must not pass vacuously: every case truncates, masks or rejects something
    _, batch = make_batch()
    for cfg in CASES:
        w, counted, d, dropped = reference_weights(batch, cfg)
        m = batch["loss_mask"].bool()
        raw = d.exp()[m]
        assert (w[m] != raw).any() and (cfg.is_mode != "mask" or dropped.any()), cfg


@pytest.mark.parametrize("cfg", [
    LossConfig(is_level="token"),
    LossConfig(is_level="sequence", is_mode="clip", is_low=0.5, is_veto=0.1, is_self_normalize=True),
    LossConfig(is_level="geometric", is_mode="mask", is_low=0.9, is_high=1.1, is_denominator="survivors",
               is_self_normalize=True),
], ids=["token", "sequence-clip-veto-sn", "geometric-mask-survivors-sn"])
@pytest.mark.parametrize("mbs_size", [7, 3])
def test_behaviour_equal_proximal_is_plain_ppo_bit_for_bit(megatron_loss, cfg, mbs_size):
    logits, batch = make_batch()
    plain = {k: v for k, v in batch.items() if k != "behaviour_logprobs"}
    same = dict(plain, behaviour_logprobs=batch["old_logprobs"].clone())
    loss0, grad0, metrics0, mbs0 = run(megatron_loss, logits, plain, LossConfig(), mbs_size)
    loss1, grad1, metrics1, mbs1 = run(megatron_loss, logits, same, cfg, mbs_size)
    assert torch.equal(loss0, loss1) and torch.equal(grad0, grad1)
    for name, value in metrics0.items():
        assert metrics1[name] == value, name
    assert metrics1["mismatch_kl_k1/mean"] == 0 and metrics1["is_weight/max"] == 1 == metrics1["is_weight/min"]


def test_without_behaviour_the_micro_batches_are_unchanged(megatron_loss):
    logits, batch = make_batch()
    plain = {k: v for k, v in batch.items() if k != "behaviour_logprobs"}
    mbs = megatron_loss.prepare_microbatches(plain, LossConfig(), 3)
    assert not any(k.startswith("is_") for mb in mbs for k in mb)
    assert torch.equal(torch.cat([mb["loss_mask"] for mb in mbs])[:B], batch["loss_mask"])
    _, _, metrics, _ = run(megatron_loss, logits, plain, LossConfig(), 3)
    assert not any(k.startswith(("is_", "mismatch")) for k in metrics)


def test_keep_count_and_survivors_denominators(megatron_loss):
    # token_mean with a geometric mask [0.8, 1.25]: keep_count divides by every loss token, survivors by the
    # tokens of the kept rows only.
    _, batch = make_batch()
    kw = dict(is_level="geometric", is_mode="mask", is_low=0.8, is_high=1.25)
    keep = megatron_loss.prepare_microbatches(batch, LossConfig(**kw), 7)[0]
    surv = megatron_loss.prepare_microbatches(batch, LossConfig(**kw, is_denominator="survivors"), 7)[0]
    n_all = int(batch["loss_mask"].sum())
    n_kept = int(((surv["is_weights"] > 0) & (batch["loss_mask"] > 0)).sum())
    assert 0 < n_kept < n_all
    assert keep["pg_weights"].max() == pytest.approx(1 / n_all)
    assert surv["pg_weights"].max() == pytest.approx(1 / n_kept)


@pytest.mark.parametrize("edit, message", [
    (lambda b: b.update(behaviour_logprobs=b["behaviour_logprobs"][:, :-1]), r"must be \[B, S\] = \[7, 6\]"),
    (lambda b: b["behaviour_logprobs"].__setitem__((3, 4), 0.25), r"\(behaviour_logprobs\) of row 3, token 4 is 0.25"),
    (lambda b: b["behaviour_logprobs"].__setitem__((6, 1), float("inf")), r"\(behaviour_logprobs\) of row 6, token 1 is inf"),
    (lambda b: b["behaviour_logprobs"].__setitem__((1, 4), float("nan")), r"\(behaviour_logprobs\) of row 1, token 4 is nan"),
    (lambda b: b.pop("behaviour_logprobs"), "is_level='token' needs batch\\['behaviour_logprobs'\\]"),
    (lambda b: b.pop("old_logprobs"), "needs batch\\['old_logprobs'\\]"),
])
def test_bad_behaviour_logprobs_are_refused_before_any_work(megatron_loss, edit, message):
    _, batch = make_batch()
    edit(batch)
    with pytest.raises(ValueError, match=message):
        megatron_loss.prepare_microbatches(batch, LossConfig(is_level="token"), 3)


def test_behaviour_logprobs_off_the_loss_mask_are_not_checked(megatron_loss):
    """Only loss tokens are checked: a positive value where the mask is 0 (row 2 has no loss token) passes."""
    _, batch = make_batch()
    batch["behaviour_logprobs"][2, 0] = 0.5
    batch["behaviour_logprobs"][1, 0] = 0.5          # row 1's loss tokens are positions 3 and 4
    assert megatron_loss.prepare_microbatches(batch, LossConfig(is_level="token"), 3)


def test_weights_match_is_checked_by_make_loss_func(megatron_loss):
    from megatron_rl_agg.mcore.loss import _check_weights_match
    _, batch = make_batch()
    mb = megatron_loss.prepare_microbatches(batch, LossConfig(is_level="token"), 7)[0]
    with pytest.raises(ValueError, match="is_level='token' \\(prepared\\) vs 'geometric'"):
        _check_weights_match(mb, LossConfig(is_level="geometric"))
    assert math.isfinite(float(mb["is_weights"].sum()))


@pytest.mark.parametrize("cfg", [CASES[1], CASES[2]], ids=["geometric-mask-survivors", "sequence-veto-sn"])
def test_packed_micro_batches_carry_the_weights(megatron_loss, cfg):
    """THD packing moves the correction tensors with their tokens: same loss, logit gradients and metrics
    as the padded micro-batches (survivors may shorten rows: packing cuts after the last loss token)."""
    from megatron_rl_agg.mcore.packing import pack, pack_microbatches

    logits, batch = make_batch()
    padded = megatron_loss.prepare_microbatches(batch, cfg, 3)
    packed = pack_microbatches(padded, pad_to_multiple_of=4)
    for k, (mb, pmb) in enumerate(zip(padded, packed)):
        rows = logits[3 * k:3 * k + 3]
        rows = torch.cat([rows, torch.zeros(3 - rows.shape[0], S, V)])
        a = rows.clone().requires_grad_(True)
        b = pack(rows, pmb["packed_layout"]).requires_grad_(True)
        loss_a, rep_a = megatron_loss.loss_func(a * 1.0, micro_batch=mb, loss_config=cfg)
        loss_b, rep_b = megatron_loss.loss_func(b * 1.0, micro_batch=pmb, loss_config=cfg)
        loss_a.backward()
        loss_b.backward()
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(b.grad, pack(a.grad, pmb["packed_layout"]), rtol=1e-6, atol=1e-9)
        for name in rep_a:
            torch.testing.assert_close(rep_b[name].double(), rep_a[name].double(), rtol=1e-6, atol=1e-9)
