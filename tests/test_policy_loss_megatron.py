"""Every registered policy loss through the Megatron loss function (one process, real kernels): the
gradient w.r.t. the logits of Megatron's schedule (each micro-batch's loss / M, summed) equals the
gradient of the whole mini-batch's objective written directly (registry loss on the full batch, the
sequence means over each row's loss tokens, ``aggregation.aggregate``), at several micro-batch sizes,
for every mode each loss defines (token_mean, seq_mean_token_mean, prompt_mean, and
seq_mean_token_sum_norm for the token-level losses), in the 2-tuple and the 3-tuple
(``calculate_per_token_loss``) contracts and with sequence packing.
Multi-process layouts: tests/megatron/test_loss_invariance.py (``pl-`` results)."""

import pytest
import torch

from megatron_rl_agg.core.aggregation import aggregate
from megatron_rl_agg.core.config import LossConfig
from megatron_rl_agg.core.logits import logprobs_from_logits
from megatron_rl_agg.core.policy_losses import POLICY_LOSSES, clamped_log_ratio, get_policy_loss, sequence_mean
from megatron_rl_agg.mcore import compat
from megatron_rl_agg.parallel.metrics import reduce_metrics

B, S, V = 7, 6, 11
ROW_TOKENS = [5, 2, 0, 4, 1, 3, 5]
GROUP_SIZES = [3, 2, 2]
# Clip bounds wide enough that some sequences / tokens are clipped and others are not.
PARAMS = {"gspo": dict(clip_eps_low=0.1, clip_eps_high=0.15), "gspo_token": dict(clip_eps_low=0.1, clip_eps_high=0.15),
          "ppo_clip": dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=2.0),
          "cispo": dict(clip_eps_high=0.2), "dppo_tv": dict(dppo_tv_delta=0.05), "dppo_kl": dict(dppo_kl_delta=0.01)}
MODES = ["token_mean", "seq_mean_token_mean", "prompt_mean", "seq_mean_token_sum_norm"]
HORIZON = 8   # L of seq_mean_token_sum_norm (> S: the constant horizon, not a row length)


@pytest.fixture(scope="module")
def mcore():
    compat.initialize_distributed()
    compat.initialize_model_parallel(tp=1, pp=1)
    from megatron_rl_agg.mcore import batch, loss, packing
    yield batch, loss, packing
    compat.destroy_model_parallel()


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, S)
    for i, k in enumerate(ROW_TOKENS):
        mask[i, :k] = 1        # left-aligned: packing keeps the first len_b tokens of each row
    logits = 2 * torch.randn(B, S, V, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    cur = logprobs_from_logits(logits, labels)
    return logits, dict(tokens=torch.randint(0, V, (B, S), generator=g), labels=labels, loss_mask=mask,
                        advantages=torch.randn(B, generator=g),
                        old_logprobs=(cur + 0.3 * torch.randn(B, S, generator=g)).clamp(max=0.0),
                        group_ids=torch.repeat_interleave(torch.arange(3), torch.tensor(GROUP_SIZES)))


def config(name, mode):
    return LossConfig(loss_aggregation=mode, policy_loss=name, max_response_length=HORIZON, **PARAMS.get(name, {}))


def schedule(mcore, logits, batch, cfg, mbs, per_token=False, packed=False):
    batch_mod, loss_mod, packing = mcore
    logits = logits.clone().requires_grad_(True)
    mbs_list = batch_mod.prepare_microbatches(batch, cfg, mbs, calculate_per_token_loss=per_token)
    total, reports, n_total = 0.0, [], 0
    for k, mb in enumerate(mbs_list):
        rows = logits[k * mbs:(k + 1) * mbs]
        rows = torch.cat([rows, rows.new_zeros(mbs - rows.shape[0], S, V)])
        if packed:
            mb, layout = packing.pack_micro_batch(mb, packing.lengths_from_loss_mask(mb["loss_mask"]))
            rows = packing.pack(rows, layout)
        out = loss_mod.loss_func(rows * 1.0, micro_batch=mb, loss_config=cfg)
        if per_token:
            n_total += int(out[1])
            total = total + out[0]
        else:
            total = total + out[0] / len(mbs_list)
        reports.append(out[-1])
    if per_token:
        total = total / n_total
    total.backward()
    return logits.grad, reduce_metrics(reports)


def reference(logits, batch, cfg):
    logits = logits.clone().requires_grad_(True)
    mask = batch["loss_mask"]
    logp = logprobs_from_logits(logits, batch["labels"])
    loss = get_policy_loss(cfg.policy_loss)
    adv = batch["advantages"].unsqueeze(-1).expand_as(logp)
    seq = None
    if loss.level == "sequence":
        seq = sequence_mean(loss.seq_token_log_ratio(clamped_log_ratio(logp, batch["old_logprobs"]), adv,
                                                     **cfg.policy_loss_params), mask)
    pg = loss(logp, batch["old_logprobs"], adv, seq_log_ratio=seq, **cfg.policy_loss_params)[0]
    value = aggregate(pg, mask, cfg.loss_aggregation, group_sizes=GROUP_SIZES, max_response_length=HORIZON)
    value.backward()
    return logits.grad, float(value.detach())


# Every loss x every mode it defines (the sequence-level losses refuse seq_mean_token_sum_norm: the last test).
CASES = [(name, mode) for name, loss in POLICY_LOSSES.items() for mode in MODES
         if not (loss.level == "sequence" and mode == "seq_mean_token_sum_norm")]


@pytest.mark.parametrize("name,mode", CASES)
def test_every_loss_equals_the_whole_batch_objective(mcore, name, mode):
    logits, batch = make_batch()
    cfg = config(name, mode)
    ref_grad, ref_value = reference(logits, batch, cfg)
    assert ref_grad.abs().max() > 1e-3
    for mbs, per_token, packed in [(7, False, False), (3, False, False), (2, True, False), (3, False, True)]:
        grad, metrics = schedule(mcore, logits, batch, cfg, mbs, per_token, packed)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{mbs} {per_token} "
                                   f"{packed}: {m}")
        assert metrics["policy_loss/sum"] == pytest.approx(ref_value, rel=1e-5, abs=1e-7)


def test_on_policy_ratio_is_one_for_every_loss(mcore):
    """old_logprobs None (the detached current log-probs): nothing clipped or masked, ppo_kl 0."""
    logits, batch = make_batch()
    batch["old_logprobs"] = None
    for name in POLICY_LOSSES:
        _, metrics = schedule(mcore, logits, batch, config(name, "seq_mean_token_mean"), 3)
        assert metrics["clip_frac/mean"] == 0.0 and metrics["ppo_kl/mean"] == 0.0, name
        assert metrics.get("masked_frac/mean", 0.0) == 0.0, name


@pytest.mark.parametrize("mode", ["token_sum", "seq_mean_token_sum", "seq_mean_token_sum_norm",
                                  "token_mean_legacy"])
@pytest.mark.parametrize("name", ["gspo", "gspo_token", "gmpo"])
def test_sequence_level_loss_refuses_length_weighted_modes(name, mode):
    with pytest.raises(ValueError, match=f"policy_loss='{name}' gives every token of a sequence"):
        LossConfig(loss_aggregation=mode, policy_loss=name, max_response_length=8)
