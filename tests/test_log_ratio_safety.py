"""Log-ratio safety: the exponent of every ratio is clamped at 20, and behaviour / reference log-probs of
real tokens are checked once per mini-batch in ``prepare_microbatches`` (finite, <= 0).

Without the clamp a behaviour log-prob of -100 on a real token makes ``exp(logp + 100)`` overflow float32
(``inf``): the loss takes the clipped branch and stays finite, but the backward of the unclipped one is
``0 * inf = NaN``.
"""

import pytest
import torch

from megatron_rl_agg.core.config import LossConfig
from megatron_rl_agg.core.kl import kl_estimate
from megatron_rl_agg.core.policy_losses import LOG_RATIO_BOUND, ppo_clipped_surrogate
from megatron_rl_agg.mcore import compat

N, S, V = 3, 5, 7


@pytest.fixture(scope="module")
def mcore():
    compat.initialize_distributed()
    compat.initialize_model_parallel(tp=1, pp=1)
    from megatron_rl_agg.mcore import batch, loss
    yield batch, loss
    compat.destroy_model_parallel()


def _batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(N, S)
    mask[:, 1:4] = 1
    return torch.randn(N, S, V, generator=g), dict(
        tokens=torch.randint(0, V, (N, S), generator=g), labels=torch.randint(0, V, (N, S), generator=g),
        loss_mask=mask, advantages=torch.tensor([1.0, -1.0, 0.5]),
        old_logprobs=-torch.rand(N, S, generator=g) - 1.5, ref_logprobs=-torch.rand(N, S, generator=g) - 1.5)


def test_surrogate_far_behaviour_logprob_gives_finite_gradient():
    # logp = -2 (float32); logp_old = -100 on token 0: log r = 98 -> clamped to 20, r = e^20 ~ 4.85e8.
    # A = +1: clipped branch -1.2 wins (max(-4.85e8, -1.2)), gradient 0; A = -1: unclipped 4.85e8 wins,
    # but d clamp / d logp = 0 beyond the bound, so the gradient is 0 too (not NaN).
    logp = torch.full((2, 2), -2.0, requires_grad=True)
    old = torch.tensor([[-100.0, -2.0], [-100.0, -2.0]])
    adv = torch.tensor([1.0, -1.0])
    loss, clipped, _ = ppo_clipped_surrogate(logp, old, adv, clip_eps_low=0.2, clip_eps_high=0.2)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert float(loss[0, 0]) == pytest.approx(-1.2)
    assert float(loss[1, 0]) == pytest.approx(float(torch.exp(torch.tensor(LOG_RATIO_BOUND))), rel=1e-6)
    # the in-bound tokens keep the plain gradient: r = 1, d(-A r)/d logp = -A
    assert logp.grad[:, 1].tolist() == [-1.0, 1.0] and logp.grad[:, 0].tolist() == [0.0, 0.0]


def test_k3_far_reference_gives_finite_gradient():
    # d = logp - ref = -2 - 0 ... with ref = +98 would be unphysical; take logp = -100, ref = -2: d = -98,
    # exp(-d) = exp(98) overflows float32 without the clamp (inf loss, NaN-free only by luck).
    logp = torch.tensor([-100.0, -2.5], requires_grad=True)
    kl = kl_estimate(logp, torch.tensor([-2.0, -2.0]), "k3")
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(logp.grad).all()


def test_loss_func_far_behaviour_logprob_gives_finite_gradient(mcore):
    batch_mod, loss_mod = mcore
    logits, batch = _batch()
    batch["old_logprobs"][1, 2] = -100.0      # a real token of a negative-advantage row
    cfg = LossConfig(loss_aggregation="token_mean")
    (mb,) = batch_mod.prepare_microbatches(batch, cfg, N)
    logits.requires_grad_(True)
    loss, _ = loss_mod.loss_func(logits * 1.0, micro_batch=mb, loss_config=cfg)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().max() > 0


@pytest.mark.parametrize("key", ["old_logprobs", "ref_logprobs"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 0.25])
def test_bad_logprob_on_a_real_token_is_refused_naming_the_row(mcore, key, value):
    batch_mod, _ = mcore
    _, batch = _batch()
    batch[key][2, 3] = value
    with pytest.raises(ValueError, match=rf"\({key}\) of row 2, token 3 is .*finite and <= 0"):
        batch_mod.prepare_microbatches(batch, LossConfig(kl_coef=0.1), 2)


def test_bad_logprob_on_a_masked_token_or_unused_reference_is_accepted(mcore):
    batch_mod, _ = mcore
    _, batch = _batch()
    batch["old_logprobs"][0, 0] = float("nan")        # loss_mask 0 there
    batch["ref_logprobs"][1, 2] = float("nan")        # real token, but kl_coef = 0: unused
    batch["old_logprobs"][2, 1] = 0.0                 # probability 1 is a valid log-prob
    assert len(batch_mod.prepare_microbatches(batch, LossConfig(), 2)) == 2
