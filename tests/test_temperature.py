"""The sampling temperature reaches every log-prob of the loss (one process, real Megatron kernels).

Rollouts are drawn from ``softmax(z / T)``, so the policy, behaviour and reference log-probs and the
entropy must all be those of ``z / T``: the loss function and the forward-only log-probs
(``forward.compute_logprobs``: behaviour log-probs and the reference) are compared with a full-vocabulary
reference written on ``logits / T``, and the on-policy ratio with behaviour log-probs recorded by the
forward-only pass is exactly 1 at T = 0.5 and 1.5. The trainer-level check (step 1 on-policy,
``ppo_kl`` below 1e-6) runs in tests/trainer/test_trainer_checkpoint.py.
"""

import pytest
import torch

from megatron_rl_agg.core.aggregation import aggregate
from megatron_rl_agg.core.config import LossConfig
from megatron_rl_agg.core.kl import kl_estimate
from megatron_rl_agg.core.logits import entropy_from_logits, logprobs_from_logits
from megatron_rl_agg.core.policy_losses import ppo_clipped_surrogate
from megatron_rl_agg.mcore import compat
from megatron_rl_agg.parallel.metrics import reduce_metrics

N, S, V = 4, 6, 13
ROW_TOKENS = [5, 2, 4, 3]


@pytest.fixture(scope="module")
def mcore():
    compat.initialize_distributed()
    compat.initialize_model_parallel(tp=1, pp=1)
    from megatron_rl_agg.mcore import batch, forward, loss
    yield batch, loss, forward
    compat.destroy_model_parallel()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(N, S)
    for i, k in enumerate(ROW_TOKENS):
        mask[i, S - 1 - k: S - 1] = 1
    logits = 2 * torch.randn(N, S, V, generator=g)
    labels = torch.randint(0, V, (N, S), generator=g)
    return logits, dict(tokens=torch.randint(0, V, (N, S), generator=g), labels=labels, loss_mask=mask,
                        advantages=torch.randn(N, generator=g),
                        old_logprobs=-torch.rand(N, S, generator=g) - 1.5,
                        ref_logprobs=-torch.rand(N, S, generator=g) - 1.5)


def _loss_grad(batch_mod, loss_mod, logits, batch, cfg):
    logits = logits.clone().requires_grad_(True)
    (mb,) = batch_mod.prepare_microbatches(batch, cfg, N)
    loss, report = loss_mod.loss_func(logits * 1.0, micro_batch=mb, loss_config=cfg)
    loss.backward()
    return logits.grad, reduce_metrics([report])


@pytest.mark.parametrize("temperature", [0.5, 1.5])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.05], ids=["H-metric", "H-bonus"])
def test_loss_uses_logits_over_temperature(mcore, temperature, entropy_coef):
    batch_mod, loss_mod, _ = mcore
    logits, batch = _batch()
    cfg = LossConfig(loss_aggregation="token_mean", kl_coef=0.1, entropy_coef=entropy_coef,
                     temperature=temperature)
    grad, metrics = _loss_grad(batch_mod, loss_mod, logits, batch, cfg)

    # reference: every term of softmax(z / T); autograd carries the 1 / T of dz/T / dz
    ref_logits = logits.clone().requires_grad_(True)
    scaled = ref_logits / temperature
    logp = logprobs_from_logits(scaled, batch["labels"])
    pg, _, _ = ppo_clipped_surrogate(logp, batch["old_logprobs"], batch["advantages"], clip_eps_low=0.2,
                                     clip_eps_high=0.2)
    mask = batch["loss_mask"]
    kl = kl_estimate(logp, batch["ref_logprobs"], "k3")
    ent = entropy_from_logits(scaled)
    total = aggregate(pg, mask, "token_mean") + 0.1 * aggregate(kl, mask, "token_mean_legacy",
                                                                 micro_batch_size=N) \
        - entropy_coef * aggregate(ent, mask, "token_mean_legacy", micro_batch_size=N)
    total.backward()
    torch.testing.assert_close(grad, ref_logits.grad, rtol=1e-5, atol=1e-7)
    m = mask.bool()
    assert metrics["entropy/mean"] == pytest.approx(float(ent[m].mean().detach()), rel=1e-5)
    assert metrics["kl/mean"] == pytest.approx(float(kl[m].mean().detach()), rel=1e-5)
    # T matters here: the same batch at T = 1 gives another gradient
    grad_t1, _ = _loss_grad(batch_mod, loss_mod, logits, batch,
                            LossConfig(loss_aggregation="token_mean", kl_coef=0.1, entropy_coef=entropy_coef))
    assert (grad_t1 - grad).abs().max() > 1e-3


def _tiny_model():
    from megatron_rl_agg.mcore.build import build_model
    from megatron_rl_agg.mcore.spec import GPTSpec
    from megatron_rl_agg.mcore.weights import init_weights
    chunks = build_model(GPTSpec(num_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=V,
                                 max_seq_length=S), wrap_ddp=False)
    init_weights(chunks, seed=0)
    return chunks


@pytest.mark.parametrize("temperature", [0.5, 1.5])
def test_recorded_behaviour_logprobs_give_ratio_one(mcore, temperature):
    """Behaviour log-probs recorded by the forward-only pass (what the trainer stores for every mini-batch
    but the first, and the reference's) equal the loss's log-probs of the same model: ppo_kl 0, no clip."""
    batch_mod, loss_mod, forward = mcore
    chunks = _tiny_model()
    _, batch = _batch(seed=1)
    with torch.no_grad():     # larger weights, so that log softmax(z / T) depends on T visibly
        for p in chunks[0].parameters():
            p.mul_(4.0)
    recorded = forward.compute_logprobs(chunks, batch["tokens"], batch["labels"], 2, temperature=temperature)
    untempered = forward.compute_logprobs(chunks, batch["tokens"], batch["labels"], 2, temperature=1.0)
    mask = batch["loss_mask"].bool()
    assert (recorded - untempered)[mask].abs().max() > 0.05          # T is not a no-op on this model
    cfg = LossConfig(loss_aggregation="token_mean", temperature=temperature)
    batch = {**batch, "old_logprobs": recorded, "ref_logprobs": None}
    reports = []
    for mb in batch_mod.prepare_microbatches(batch, cfg, 2):
        output, bound = loss_mod.forward_step(iter([mb]), chunks[0])
        reports.append(bound(output)[1])
    metrics = reduce_metrics(reports)
    assert abs(metrics["ppo_kl/mean"]) < 1e-6
    assert metrics["clip_frac/mean"] == 0.0
    # the same check at T = 1 against log-probs recorded at T: the ratio is far from 1
    reports = []
    for mb in batch_mod.prepare_microbatches(batch, LossConfig(loss_aggregation="token_mean"), 2):
        output, bound = loss_mod.forward_step(iter([mb]), chunks[0])
        reports.append(bound(output)[1])
    assert abs(reduce_metrics(reports)["ppo_kl/mean"]) > 1e-3


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_temperature_out_of_range_is_named(value):
    with pytest.raises(ValueError, match=r"temperature \(--temperature\) must be"):
        LossConfig(temperature=value)
