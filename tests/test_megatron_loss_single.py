"""The Megatron loss function in one process (world of one, real parallel_state and Megatron kernels).

The loss function is driven the way Megatron's schedule drives it (every micro-batch's loss divided by
the number of micro-batches M and summed) and its gradient w.r.t. the logits is compared with the
gradient of an independent brute-force objective written from the mode definitions
(``aggregation.aggregate`` on the whole mini-batch, full-vocabulary log-softmax). Multi-process layouts
(TP, PP, DP) are covered by tests/megatron/test_loss_invariance.py.
"""

import functools
import types

import pytest
import torch
import torch.utils._python_dispatch
import torch.utils._pytree

from megatron_rl_agg.core.kl import kl_estimate
from megatron_rl_agg.core.logits import entropy_from_logits, logprobs_from_logits
from megatron_rl_agg.core.policy_losses import ppo_clipped_surrogate
from megatron_rl_agg.mcore import compat
from megatron_rl_agg.core.aggregation import LOSS_AGGREGATIONS, aggregate
from megatron_rl_agg.core.config import TERM_AGGREGATIONS, LossConfig
from megatron_rl_agg.core.metrics import average_over_minibatches
from megatron_rl_agg.parallel.metrics import reduce_metrics

B, S, V = 7, 6, 11
GROUP_SIZES = [3, 2, 2]       # with micro_batch_size 3 the last group straddles micro-batches 1 and 2
ROW_TOKENS = [5, 2, 0, 4, 1, 3, 5]  # unequal lengths and one fully masked row
HORIZON = 6


@pytest.fixture(scope="module")
def megatron_loss():
    compat.initialize_distributed()
    compat.initialize_model_parallel(tp=1, pp=1)
    from megatron_rl_agg.mcore import batch, logprobs, loss, setup_checks
    # the loss API from the modules that own it
    yield types.SimpleNamespace(
        prepare_microbatches=batch.prepare_microbatches, check_megatron_setup=setup_checks.check_megatron_setup,
        vocab_parallel_logprobs_and_entropy=logprobs.vocab_parallel_logprobs_and_entropy,
        vocab_parallel_logprobs=logprobs.vocab_parallel_logprobs,
        vocab_parallel_entropy=logprobs.vocab_parallel_entropy,
        loss_func=loss.loss_func, make_loss_func=loss.make_loss_func, forward_step=loss.forward_step)
    compat.destroy_model_parallel()


def make_batch(seed=0, row_tokens=ROW_TOKENS):
    g = torch.Generator().manual_seed(seed)
    n = len(row_tokens)
    mask = torch.zeros(n, S)
    for i, k in enumerate(row_tokens):
        mask[i, S - 1 - k: S - 1] = 1     # response tokens end one before the padded width
    logits = torch.randn(n, S, V, generator=g)
    labels = torch.randint(0, V, (n, S), generator=g)
    # Behaviour / reference log-probs near the current ones, so ratios spread over roughly [0.6, 1.7]
    # and both clip bounds are hit.
    cur = logprobs_from_logits(logits, labels)
    batch = dict(
        tokens=torch.randint(0, V, (n, S), generator=g),
        labels=labels,
        loss_mask=mask,
        advantages=torch.randn(n, generator=g),
        old_logprobs=cur + 0.3 * torch.randn(n, S, generator=g),
        ref_logprobs=cur + 0.5 * torch.randn(n, S, generator=g),
        group_ids=torch.repeat_interleave(torch.arange(len(GROUP_SIZES)), torch.tensor(GROUP_SIZES))
        if n == B else torch.zeros(n, dtype=torch.int64),
    )
    return logits, batch


def run_schedule(module, logits, batch, cfg, micro_batch_size, per_token=False):
    """What Megatron's schedule and DDP do at D = 1: with 2-tuples the sum over micro-batches of loss / M;
    with 3-tuples (``calculate_per_token_loss``) the sum of the unscaled losses, divided once by the total
    of the returned token counts (finalize_model_grads)."""
    logits = logits.clone().requires_grad_(True)
    mbs = module.prepare_microbatches(batch, cfg, micro_batch_size, calculate_per_token_loss=per_token)
    total, reports, n_total = 0.0, [], 0
    for k, mb in enumerate(mbs):
        rows = logits[k * micro_batch_size: (k + 1) * micro_batch_size]
        pad = micro_batch_size - rows.shape[0]
        if pad:
            rows = torch.cat([rows, torch.zeros(pad, S, V)])
        # The model's output is a fresh tensor; the vocab-parallel cross entropy rewrites it in place.
        out = module.loss_func(rows * 1.0, micro_batch=mb, loss_config=cfg)
        if per_token:
            loss, n, report = out
            assert n.dtype == torch.int32 and n.dim() == 0     # Megatron adds it to an int32 total
            n_total += int(n)
            total = total + loss
        else:
            loss, report = out
            total = total + loss / len(mbs)
        reports.append(report)
    if per_token:
        total = total / n_total
    total.backward()
    return logits.grad, reduce_metrics(reports), len(mbs)


def reference(logits, batch, cfg, micro_batch_size):
    """Brute-force objective (terms and total) of the whole mini-batch, straight from the definitions."""
    logits = logits.clone().requires_grad_(True)
    mask = batch["loss_mask"]
    logp = logprobs_from_logits(logits, batch["labels"])
    pg, clipped, _ = ppo_clipped_surrogate(
        logp, batch["old_logprobs"], batch["advantages"], clip_eps_low=cfg.clip_eps_low,
        clip_eps_high=cfg.clip_eps_high, dual_clip_c=cfg.dual_clip_c)
    kl = kl_estimate(logp, batch["ref_logprobs"], cfg.kl_estimator)
    ent = entropy_from_logits(logits)

    def agg(values, mode):
        # microbatch_mean = the mean over micro-batches of each one's token mean = the legacy mode.
        mode = "token_mean_legacy" if mode == "microbatch_mean" else mode
        return aggregate(values, mask, mode, group_sizes=GROUP_SIZES, max_response_length=HORIZON,
                         micro_batch_size=micro_batch_size)

    terms = {"policy_loss/sum": agg(pg, cfg.loss_aggregation),
             "kl_loss/sum": agg(kl, cfg.kl_aggregation),
             "entropy_loss/sum": agg(ent, cfg.entropy_aggregation)}
    total = terms["policy_loss/sum"] + cfg.kl_coef * terms["kl_loss/sum"] \
        - cfg.entropy_coef * terms["entropy_loss/sum"]
    total.backward()
    m = mask.bool()
    means = {"kl/mean": kl[m].mean(), "entropy/mean": ent[m].mean(),
             "clip_frac/mean": clipped[m].double().mean()}
    values = {k: float(v.detach()) for k, v in {**terms, **means, "loss/sum": total}.items()}
    return logits.grad, values


def config(mode, **kw):
    return LossConfig(loss_aggregation=mode, max_response_length=HORIZON, clip_eps_low=0.2,
                      clip_eps_high=0.28, **kw)


CASES = [config(m, kl_coef=0.1, entropy_coef=0.01) for m in LOSS_AGGREGATIONS] + [
    config("seq_mean_token_mean", kl_coef=0.2, kl_estimator="k1", kl_aggregation="token_mean",
           entropy_coef=0.05, entropy_aggregation="prompt_mean", dual_clip_c=2.0),
    config("prompt_mean", kl_coef=0.3, kl_estimator="k2", kl_aggregation="seq_mean_token_sum_norm",
           entropy_coef=0.05, entropy_aggregation="token_sum"),
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.loss_aggregation}-{c.kl_aggregation}-"
                                                     f"{c.entropy_aggregation}")
@pytest.mark.parametrize("micro_batch_size", [7, 3, 2])
def test_schedule_gradient_and_metrics_equal_reference(megatron_loss, cfg, micro_batch_size):
    logits, batch = make_batch()
    grad, metrics, num_mb = run_schedule(megatron_loss, logits, batch, cfg, micro_batch_size)
    ref_grad, ref = reference(logits, batch, cfg, micro_batch_size)
    assert num_mb == -(-B // micro_batch_size)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert ref_grad.abs().max() > 1e-3
    for name, value in ref.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert metrics["num_tokens/sum"] == sum(ROW_TOKENS)


def test_policy_gradient_independent_of_micro_batch_size(megatron_loss):
    # Checked directly as well: grad at M = 1 equals grad at M = 4, except for the legacy mode, whose
    # objective is a mean of micro-batch means (two rows per micro-batch: 7, 4, 4 and 5 tokens here).
    logits, batch = make_batch()
    for mode in LOSS_AGGREGATIONS:
        cfg = config(mode)
        g1 = run_schedule(megatron_loss, logits, batch, cfg, 7)[0]
        g4 = run_schedule(megatron_loss, logits, batch, cfg, 2)[0]
        rel = ((g1 - g4).abs().max() / g1.abs().max()).item()
        assert (rel > 1e-3) if mode == "token_mean_legacy" else (rel < 1e-6), (mode, rel)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_and_entropy_gradient_does_not_grow_with_micro_batches(megatron_loss, estimator):
    # Every row has 3 loss tokens, so micro-batches of equal size have equal token counts and the mean of
    # micro-batch token means is the global token mean: the gradient must not depend on M at all.
    logits, batch = make_batch(seed=1, row_tokens=[3] * 8)
    batch["advantages"] = torch.zeros(8)
    cfg = LossConfig(kl_coef=0.1, kl_estimator=estimator, entropy_coef=0.05)
    grads = [run_schedule(megatron_loss, logits, batch, cfg, mbs)[0] for mbs in (8, 2)]
    assert grads[0].abs().max() > 1e-4
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)


def test_padding_rows_change_nothing(megatron_loss):
    logits, batch = make_batch()
    cfg = config("seq_mean_token_mean", kl_coef=0.1)
    mbs = megatron_loss.prepare_microbatches(batch, cfg, 4)
    assert len(mbs) == 2 and mbs[1]["tokens"].shape[0] == 4
    assert mbs[1]["loss_mask"][3].sum() == 0 and mbs[1]["pg_weights"][3].abs().sum() == 0
    assert sum(float(mb["pg_weights"].sum()) for mb in mbs) == pytest.approx(1.0)


def test_attention_mask_is_sliced_and_padded(megatron_loss):
    _, batch = make_batch()
    causal = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)   # True = masked out
    per_row = causal.expand(B, 1, S, S).clone()
    per_row[6, 0, :, 0] = True                                         # make the last real row distinct
    mbs = megatron_loss.prepare_microbatches({**batch, "attention_mask": per_row}, config("token_mean"), 4)
    assert [mb["attention_mask"].shape[0] for mb in mbs] == [4, 4]
    assert torch.equal(mbs[1]["attention_mask"][:3], per_row[4:7])
    # The padded row copies a real row's mask; an all-masked attention row would make NaN logits.
    assert torch.equal(mbs[1]["attention_mask"][3], per_row[6])
    shared = megatron_loss.prepare_microbatches({**batch, "attention_mask": causal[None, None]},
                                                config("token_mean"), 4)
    assert all(mb["attention_mask"].shape == (1, 1, S, S) for mb in shared)


def test_on_policy_without_old_logprobs_is_ratio_one(megatron_loss):
    # old_logprobs=None: r = 1, pg = -A per token, d pg / d logp = -A (vanilla policy gradient).
    logits, batch = make_batch()
    batch["old_logprobs"] = None
    cfg = config("token_mean")
    grad, metrics, _ = run_schedule(megatron_loss, logits, batch, cfg, 3)
    mask = batch["loss_mask"]
    expected = -(batch["advantages"].unsqueeze(1) * mask).sum() / mask.sum()
    assert metrics["policy_loss/sum"] == pytest.approx(float(expected), rel=1e-6)
    assert metrics["clip_frac/mean"] == 0.0 and metrics["ppo_kl/mean"] == 0.0
    lp = logits.clone().requires_grad_(True)
    logp = logprobs_from_logits(lp, batch["labels"])
    (-(batch["advantages"].unsqueeze(1) * mask * logp).sum() / mask.sum()).backward()
    torch.testing.assert_close(grad, lp.grad, rtol=1e-5, atol=1e-7)


def test_vocab_parallel_terms_equal_full_vocab_reference_at_tp1(megatron_loss):
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(2, 5, V, generator=g)).requires_grad_(True)
    labels = torch.randint(0, V, (2, 5), generator=g)
    u, w = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    ent = megatron_loss.vocab_parallel_entropy(logits * 1.0)
    lp = megatron_loss.vocab_parallel_logprobs(logits * 1.0, labels)
    ((u * lp).sum() + (w * ent).sum()).backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_ent = entropy_from_logits(ref_logits)
    ref_lp = logprobs_from_logits(ref_logits, labels)
    ((u * ref_lp).sum() + (w * ref_ent).sum()).backward()
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# the fused log-prob + entropy kernel loss_func uses (TP1 here; TP2 in tests/megatron)
# ----------------------------------------------------------------------------------------------

def fused_case(dtype, seed=5, n=3, s=5, vocab=V):
    """Logits spread over ~[-12, 12], labels, a loss mask with holes, and per-token weights that are 0
    off the mask (as loss_func's are)."""
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(n, s, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (n, s), generator=g)
    mask = torch.rand(n, s, generator=g) < 0.6
    mask[0, 0], mask[-1, -1] = True, False
    u = torch.randn(n, s, generator=g) * mask
    w = torch.randn(n, s, generator=g) * mask
    return logits, labels, mask, u, w


def full_vocab_reference(logits, labels, u, w, entropy_grad):
    """Log-probs, entropies and d(sum u logp + sum w H)/dlogits from full-vocabulary log_softmax (fp32)."""
    ref = logits.float().clone().requires_grad_(True)
    lp, ent = logprobs_from_logits(ref, labels), entropy_from_logits(ref)
    ((u * lp).sum() + ((w * ent).sum() if entropy_grad else 0)).backward()
    return lp.detach(), ent.detach(), ref.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("entropy_grad", [False, True], ids=["H-metric", "H-grad"])
@pytest.mark.parametrize("chunk_rows", [None, 1, 4], ids=["chunk-default", "chunk1", "chunk4"])
def test_fused_logprobs_entropy_equal_full_vocab_reference(megatron_loss, dtype, entropy_grad, chunk_rows):
    # 15 rows: chunk4 runs 4 + 4 + 4 + 3, so a short last chunk is covered.
    logits, labels, mask, u, w = fused_case(dtype)
    leaf = logits.clone().requires_grad_(True)
    lp, ent = megatron_loss.vocab_parallel_logprobs_and_entropy(
        leaf * 1, labels, entropy_grad=entropy_grad, chunk_rows=chunk_rows)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == labels.shape
    assert ent.requires_grad == entropy_grad
    ((u * lp).sum() + ((w * ent).sum() if entropy_grad else 0)).backward()
    ref_lp, ref_ent, ref_grad = full_vocab_reference(logits, labels, u, w, entropy_grad)
    # Forward in fp32 from the (possibly bf16) inputs: fp32 round-off only.
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=2e-6)
    assert leaf.grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(leaf.grad, ref_grad, rtol=1e-5, atol=1e-6)
    else:   # computed in fp32, rounded once to bf16 (8 significant bits)
        torch.testing.assert_close(leaf.grad, ref_grad.to(dtype), rtol=2 ** -7, atol=1e-6)
    assert ref_grad.abs().max() > 0.1
    # Masked tokens (weights 0) get an exactly zero gradient row, not a tiny or NaN one.
    assert torch.all(leaf.grad[~mask] == 0)


def test_fused_entropy_metric_has_no_gradient_path(megatron_loss):
    # entropy_grad=False: the entropy is a plain tensor; the backward equals the log-prob-only gradient.
    logits, labels, _, u, _ = fused_case(torch.float32, seed=6)
    leaf = logits.clone().requires_grad_(True)
    lp, ent = megatron_loss.vocab_parallel_logprobs_and_entropy(leaf * 1, labels, entropy_grad=False)
    assert not ent.requires_grad and ent.grad_fn is None
    (u * lp).sum().backward()
    torch.testing.assert_close(leaf.grad, full_vocab_reference(logits, labels, u, u, False)[2],
                               rtol=1e-5, atol=1e-6)


def test_fused_entropy_alone_and_logprob_alone_gradients(megatron_loss):
    # Only one output in the loss: the other output's gradient is None inside the backward.
    logits, labels, _, u, w = fused_case(torch.float32, seed=7)
    for use_logp in (False, True):
        leaf = logits.clone().requires_grad_(True)
        lp, ent = megatron_loss.vocab_parallel_logprobs_and_entropy(leaf * 1, labels, entropy_grad=True)
        ((u * lp).sum() if use_logp else (w * ent).sum()).backward()
        ref = logits.clone().requires_grad_(True)
        ((u * logprobs_from_logits(ref, labels)).sum() if use_logp
         else (w * entropy_from_logits(ref)).sum()).backward()
        torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=1e-6)
        assert ref.grad.abs().max() > 0.1


def test_fused_handles_minus_inf_logits(megatron_loss):
    # A vocabulary entry masked with -inf has p = 0 and contributes nothing (0 * log 0 = 0): outputs and
    # gradients equal those with -1e4 there (exp underflows to 0 in fp32 either way), with no NaN.
    logits, labels, _, u, w = fused_case(torch.float32, seed=8)
    banned = torch.zeros_like(logits, dtype=torch.bool)
    banned[..., 3] = True
    labels = torch.where(labels == 3, 4, labels)
    for entropy_grad in (False, True):
        leaf = logits.masked_fill(banned, float("-inf")).requires_grad_(True)
        lp, ent = megatron_loss.vocab_parallel_logprobs_and_entropy(leaf * 1, labels,
                                                                    entropy_grad=entropy_grad)
        ((u * lp).sum() + (w * ent).sum() * entropy_grad).backward()
        ref_lp, ref_ent, ref_grad = full_vocab_reference(logits.masked_fill(banned, -1e4), labels, u, w,
                                                         entropy_grad)
        torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(leaf.grad, ref_grad, rtol=1e-5, atol=1e-6)
        assert torch.all(leaf.grad[banned] == 0)


def test_vocab_parallel_entropy_leaves_its_input_unchanged(megatron_loss):
    # The standalone entropy works on its own fp32 copy (loss_func's fused call rewrites the logits).
    logits, _, _, _, w = fused_case(torch.float32, seed=10)
    leaf = logits.clone().requires_grad_(True)
    ent = megatron_loss.vocab_parallel_entropy(leaf)
    assert torch.equal(leaf.detach(), logits)
    (w * ent).sum().backward()
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64)       # unused: log-prob weights are 0
    _, ref_ent, ref_grad = full_vocab_reference(logits, labels, torch.zeros_like(w), w, True)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(leaf.grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_fused_rejects_bad_labels(megatron_loss):
    logits, labels, *_ = fused_case(torch.float32)
    fn = megatron_loss.vocab_parallel_logprobs_and_entropy
    for bad in (V, -100):
        wrong = labels.clone()
        wrong[1, 2] = bad
        with pytest.raises(ValueError, match=rf"label id {bad} is outside the vocabulary \[0, {V}\)"):
            fn(logits.clone(), wrong)
    with pytest.raises(ValueError, match=r"labels must have the logits' shape without the vocab dim"):
        fn(logits.clone(), labels[:, :-1])
    with pytest.raises(ValueError, match="labels must be an integer tensor of vocab ids, got dtype "
                                         "torch.float32"):
        fn(logits.clone(), labels.float())
    with pytest.raises(ValueError, match="chunk_rows must be a positive int or None, got 0"):
        fn(logits.clone(), labels, chunk_rows=0)


class LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the largest storage any aten op creates (outputs that are not views of an input),
    forward and backward alike (the backward runs on this thread for CPU tensors)."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves
        inputs = {t.untyped_storage().data_ptr() for t in leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                if t.untyped_storage().nbytes() > self.nbytes:
                    self.nbytes, self.op = t.untyped_storage().nbytes(), str(func)
        return out


@pytest.mark.parametrize("kw", [{}, dict(kl_coef=0.1, entropy_coef=0.01)], ids=["default", "kl+H-bonus"])
def test_loss_path_allocates_no_logits_sized_tensor(megatron_loss, kw):
    """The whole loss path, forward and backward down to dL/dlogits, creates no tensor of even a quarter
    of the fp32 logits (U): the kernel works in place, its temporaries are chunks of rows. (The entropy
    of the previous implementation allocated 3 U here.)"""
    n, s, vocab = 2, 128, 4096                    # U = 4 MiB; the default chunk is 512 KiB
    g = torch.Generator().manual_seed(9)
    mask = (torch.rand(n, s, generator=g) < 0.7).float()
    batch = dict(tokens=torch.zeros(n, s, dtype=torch.int64),
                 labels=torch.randint(0, vocab, (n, s), generator=g), loss_mask=mask,
                 advantages=torch.randn(n, generator=g),
                 old_logprobs=torch.full((n, s), -8.0), ref_logprobs=torch.full((n, s), -8.1))
    cfg = LossConfig(**kw)
    (mb,) = megatron_loss.prepare_microbatches(batch, cfg, n)
    logits = torch.randn(n, s, vocab, generator=g).requires_grad_(True)
    unit = logits.numel() * 4
    tracker = LargestAllocation()
    with tracker:
        loss, _ = megatron_loss.loss_func(logits, micro_batch=mb, loss_config=cfg)
        loss.backward()
    assert logits.grad is not None and logits.grad.abs().max() > 0
    assert tracker.nbytes <= unit // 8, (tracker.op, tracker.nbytes, unit)


# ----------------------------------------------------------------------------------------------
# refusals and input errors
# ----------------------------------------------------------------------------------------------

def tiny_model(**overrides):
    from megatron_rl_agg.mcore.build import build_model
    from megatron_rl_agg.mcore.spec import GPTSpec
    from megatron_rl_agg.mcore.weights import init_weights
    chunks = build_model(GPTSpec(num_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=V,
                                 max_seq_length=S), **overrides)
    init_weights(chunks, seed=0)
    return chunks


def test_two_tuple_under_calculate_per_token_loss_is_refused_with_the_reason(megatron_loss):
    (model,) = tiny_model(calculate_per_token_loss=True)
    _, batch = make_batch()
    mbs = megatron_loss.prepare_microbatches(batch, config("token_mean"), 7)
    with pytest.raises(ValueError, match=r"prepared without it.*D x CP times too large.*"
                                         r"calculate_per_token_loss=True to prepare_microbatches"):
        megatron_loss.forward_step(iter(mbs), model)


def test_three_tuple_without_the_flag_is_refused(megatron_loss):
    (model,) = tiny_model()
    _, batch = make_batch()
    mbs = megatron_loss.prepare_microbatches(batch, config("token_mean"), 7, calculate_per_token_loss=True)
    with pytest.raises(ValueError, match=r"prepared with calculate_per_token_loss=True but the model"):
        megatron_loss.forward_step(iter(mbs), model)


def test_per_token_loss_with_average_in_collective_is_refused(megatron_loss):
    from megatron.core.distributed import DistributedDataParallelConfig
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, average_in_collective=True)
    with pytest.raises(ValueError, match=r"cannot be combined with average_in_collective=True"):
        tiny_model(calculate_per_token_loss=True, ddp_config=ddp)


def test_context_parallel_size_mismatch_is_refused(megatron_loss):
    from megatron_rl_agg.mcore.spec import GPTSpec, get_transformer_config
    cfg = get_transformer_config(GPTSpec(num_layers=1, hidden_size=8, num_attention_heads=2,
                                         vocab_size=V, max_seq_length=S), context_parallel_size=2)
    _, batch = make_batch()
    (mb,) = megatron_loss.prepare_microbatches(batch, config("token_mean"), 7)
    megatron_loss.check_megatron_setup(cfg)          # the config alone is fine: CP is supported
    with pytest.raises(ValueError, match=r"prepared for context-parallel size 1 but the model's is 2"):
        megatron_loss.check_megatron_setup(cfg, mb)


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.loss_aggregation}-{c.kl_aggregation}-"
                                                     f"{c.entropy_aggregation}")
@pytest.mark.parametrize("micro_batch_size", [7, 3])
def test_per_token_loss_three_tuple_gives_the_same_gradient(megatron_loss, cfg, micro_batch_size):
    """Under the flag (sum of unscaled 3-tuple losses / N) every mode, global and micro-batch-mean KL /
    entropy included, has the 2-tuple path's gradient and metrics."""
    logits, batch = make_batch()
    grad, metrics, _ = run_schedule(megatron_loss, logits, batch, cfg, micro_batch_size)
    grad_flag, metrics_flag, _ = run_schedule(megatron_loss, logits, batch, cfg, micro_batch_size,
                                              per_token=True)
    torch.testing.assert_close(grad_flag, grad, rtol=1e-5, atol=1e-8)
    for key, value in metrics.items():
        assert metrics_flag[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_per_token_loss_arithmetic_written_out(megatron_loss):
    """b = 3 rows of S = 6 per micro-batch, M = ceil(7 / 3) = 3: each micro-batch reports its REAL tokens
    (the padding row of the last one excluded: n = 18, 18, 6) and N = 42. A token_sum policy term
    (w = mask) returns N * sum(mask * pg); a micro-batch-mean KL returns (N / (M * D)) * sum(kl) / n_tokens
    with D = 1, i.e. 14 * the micro-batch's KL token mean. A ``token_mask`` (columns past a row's end)
    takes its zeros out of n and N too, and every micro-batch carries the padding mask."""
    logits, batch = make_batch()
    batch["advantages"] = torch.zeros(B)                 # no policy term: the KL alone
    cfg = config("token_sum", kl_coef=1.0, kl_estimator="k1")
    mbs = megatron_loss.prepare_microbatches(batch, cfg, 3, calculate_per_token_loss=True)
    assert len(mbs) == 3
    assert [int(mb["num_tokens"]) for mb in mbs] == [18, 18, 6]
    assert float(mbs[0]["total_tokens"]) == 42.0
    assert mbs[2]["padding_mask"].tolist() == [[False] * 6, [True] * 6, [True] * 6]
    assert not any(mb["empty_microbatches"] for mb in mbs)
    mb = mbs[0]
    loss, n, _ = megatron_loss.loss_func(logits[:3].clone(), micro_batch=mb, loss_config=cfg)
    logp = logprobs_from_logits(logits[:3], batch["labels"][:3])
    kl = (logp - batch["ref_logprobs"][:3]) * batch["loss_mask"][:3]          # k1 = log p - log p_ref
    expected = 14.0 * kl.sum() / batch["loss_mask"][:3].sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert int(n) == 18
    token_mask = torch.ones(B, 6)
    token_mask[0, 4:] = 0                                 # row 0 ends after 4 tokens
    batch["token_mask"] = token_mask
    mbs = megatron_loss.prepare_microbatches(batch, cfg, 3, calculate_per_token_loss=True)
    assert [int(mb["num_tokens"]) for mb in mbs] == [16, 18, 6]
    assert float(mbs[0]["total_tokens"]) == 40.0
    assert mbs[0]["padding_mask"][0].tolist() == [False] * 4 + [True] * 2


def test_forward_step_runs_a_real_model(megatron_loss):
    (model,) = tiny_model()
    _, batch = make_batch()
    batch["tokens"] = batch["tokens"] % V
    mb = megatron_loss.prepare_microbatches(batch, config("token_mean", kl_coef=0.1), 7)[0]
    output, bound = megatron_loss.forward_step(iter([mb]), model)
    assert isinstance(bound, functools.partial) and bound.func is megatron_loss.loss_func
    assert output.shape == (B, S, V)
    loss, report = bound(output)
    assert loss.dim() == 0 and torch.isfinite(loss) and "policy_loss/sum" in report


def test_dp_size_mismatch_is_refused(megatron_loss):
    (model,) = tiny_model()
    _, batch = make_batch()
    mb = megatron_loss.prepare_microbatches(batch, config("token_mean"), 7)[0]
    mb["dp_size"] = 2   # as if prepared over a DP group of 2 while the model has DP = 1
    with pytest.raises(ValueError, match="dp_size=2 but the model's data-parallel size is 1"):
        megatron_loss.make_loss_func(mb, model)


def test_missing_inputs_are_named(megatron_loss):
    _, batch = make_batch()
    with pytest.raises(ValueError, match="kl_coef=0.1 needs batch\\['ref_logprobs'\\]"):
        megatron_loss.prepare_microbatches({**batch, "ref_logprobs": None},
                                           config("token_mean", kl_coef=0.1), 3)
    with pytest.raises(ValueError, match="needs batch\\['group_ids'\\]"):
        megatron_loss.prepare_microbatches({**batch, "group_ids": None}, config("prompt_mean"), 3)
    with pytest.raises(ValueError, match="missing 'advantages'"):
        megatron_loss.prepare_microbatches({**batch, "advantages": None}, config("token_mean"), 3)
    with pytest.raises(ValueError, match=r"advantages'\] must be \[B\] or \[B, S\]"):
        megatron_loss.prepare_microbatches({**batch, "advantages": torch.zeros(3)}, config("token_mean"), 3)
    with pytest.raises(ValueError, match="micro_batch_size must be a positive int"):
        megatron_loss.prepare_microbatches(batch, config("token_mean"), 0)


@pytest.mark.parametrize("field", ["kl_aggregation", "entropy_aggregation"])
def test_bad_term_aggregation_lists_valid_choices(field):
    with pytest.raises(ValueError) as err:
        LossConfig(**{field: "token_meen"})
    message = str(err.value)
    assert "token_meen" in message and field in message
    for choice in TERM_AGGREGATIONS:
        assert choice in message
    assert "microbatch_mean" in TERM_AGGREGATIONS and "token_mean_legacy" not in TERM_AGGREGATIONS


# ----------------------------------------------------------------------------------------------
# metrics reduction (single process; the DP all-reduce is exercised by the torchrun test)
# ----------------------------------------------------------------------------------------------

def test_reduce_metrics_by_suffix():
    reports = [
        {"a/sum": torch.tensor(1.5), "b/mean": torch.tensor([3.0, 2.0]), "c/max": torch.tensor(4.0),
         "d/min": torch.tensor(-1.0)},
        {"a/sum": torch.tensor(2.5), "b/mean": torch.tensor([5.0, 6.0]), "c/max": torch.tensor(7.0),
         "d/min": torch.tensor(2.0)},
    ]
    out = reduce_metrics(reports)
    # a: 1.5 + 2.5 = 4; b: (3 + 5) / (2 + 6) = 1 (a mean of micro-batch means would be (1.5 + 0.83) / 2)
    assert out == {"a/sum": 4.0, "b/mean": 1.0, "c/max": 7.0, "d/min": -1.0}


def test_reduce_metrics_empty_mean_is_zero_not_nan():
    assert reduce_metrics([{"x/mean": torch.tensor([0.0, 0.0])}]) == {"x/mean": 0.0}
    assert reduce_metrics([]) == {}


def test_reduce_metrics_errors():
    with pytest.raises(ValueError, match=r"'loss' must end in one of /sum, /mean, /max, /min"):
        reduce_metrics([{"loss": torch.tensor(1.0)}])
    with pytest.raises(ValueError, match=r"must be a tensor of shape \(2,\)"):
        reduce_metrics([{"x/mean": torch.tensor(1.0)}])
    with pytest.raises(ValueError, match="report 1 has names"):
        reduce_metrics([{"x/sum": torch.tensor(1.0)}, {"y/sum": torch.tensor(1.0)}])


def test_average_over_minibatches():
    out = average_over_minibatches([{"a/sum": 1.0, "b/max": 3.0, "c/min": 0.0, "d/mean": 2.0},
                                    {"a/sum": 3.0, "b/max": 1.0, "c/min": -2.0, "d/mean": 4.0}])
    assert out == {"a/sum": 2.0, "b/max": 3.0, "c/min": -2.0, "d/mean": 3.0}
    with pytest.raises(ValueError, match="mini-batch 1 has metrics"):
        average_over_minibatches([{"a/sum": 1.0}, {"b/sum": 1.0}])


def test_micro_batches_without_a_real_token_are_flagged(megatron_loss):
    """B = 7 rows, 3 per micro-batch (M = 3): with rows 3-5 of token_mask 0 the second micro-batch holds no
    real token, and so does none other (the third has row 6 and two padding rows). The flags an MoE
    model's padding mask needs (mcore.moe_padding) come from the one read of prepare_microbatches."""
    _, batch = make_batch()
    cfg = config("token_sum")
    mbs = megatron_loss.prepare_microbatches(batch, cfg, 3)
    assert [mb["no_real_token"] for mb in mbs] == [False, False, False]
    assert [mb["any_padding"] for mb in mbs] == [True] * 3          # the two padding rows of the last
    assert not any(mb["empty_microbatches"] for mb in mbs)
    token_mask = torch.ones(B, 6)
    token_mask[3:6] = 0
    mbs = megatron_loss.prepare_microbatches({**batch, "token_mask": token_mask}, cfg, 3)
    assert [mb["no_real_token"] for mb in mbs] == [False, True, False]
    assert all(mb["empty_microbatches"] for mb in mbs)
    mbs = megatron_loss.prepare_microbatches({k: v[:6] for k, v in batch.items()}, cfg, 3)
    assert [(mb["no_real_token"], mb["any_padding"], mb["empty_microbatches"]) for mb in mbs] == [(False,) * 3] * 2


def _moe_stub(**overrides):
    fields = dict(num_moe_experts=4, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=None,
                  moe_router_load_balancing_type="aux_loss", moe_router_enable_expert_bias=False,
                  recompute_granularity=None)
    fields.update(overrides)
    return types.SimpleNamespace(config=types.SimpleNamespace(**fields))


def test_masked_forward_leaves_out_an_empty_micro_batch_and_refuses_what_it_cannot(megatron_loss):
    """moe_padding.masked_forward: the mask for an MoE model, nothing for a dense one; the aux coefficient
    at 0 only inside the forward of a micro-batch without a real token; clear refusals for the expert
    bias with padding, global_aux_loss and recomputation with an empty micro-batch."""
    from megatron_rl_agg.mcore.moe_padding import masked_forward

    mask = torch.tensor([[False, True]])
    mb = {"padding_mask": mask, "no_real_token": False, "empty_microbatches": True, "any_padding": True}
    dense = types.SimpleNamespace(config=types.SimpleNamespace(num_moe_experts=None))
    with masked_forward(dense, mb) as kw:
        assert kw == {}
    model = _moe_stub()
    with masked_forward(model, mb) as kw:
        assert kw["padding_mask"] is mask and model.config.moe_aux_loss_coeff == 0.1
    for coeff, off in ((0.1, 0.0), ([0.1, 0.2], [0.0, 0.0])):
        model = _moe_stub(moe_aux_loss_coeff=coeff)
        with masked_forward(model, {**mb, "no_real_token": True}) as kw:
            assert kw["padding_mask"] is mask and model.config.moe_aux_loss_coeff == off
        assert model.config.moe_aux_loss_coeff == coeff
    with pytest.raises(ValueError, match="moe_router_enable_expert_bias=True with padding tokens"):
        with masked_forward(_moe_stub(moe_router_enable_expert_bias=True), mb):
            pass
    with masked_forward(_moe_stub(moe_router_enable_expert_bias=True), {**mb, "any_padding": False,
                                                                         "empty_microbatches": False}) as kw:
        assert kw["padding_mask"] is mask
    with pytest.raises(ValueError, match="'global_aux_loss' with a micro-batch that holds no real token"):
        with masked_forward(_moe_stub(moe_router_load_balancing_type=["aux_loss", "global_aux_loss"],
                                      moe_aux_loss_coeff=[0.1, 0.1]), mb):
            pass
    with pytest.raises(ValueError, match="recompute_granularity='full' with an MoE aux loss"):
        with masked_forward(_moe_stub(recompute_granularity="full"), mb):
            pass
    with masked_forward(_moe_stub(recompute_granularity="full", moe_aux_loss_coeff=0.0), mb) as kw:
        assert kw["padding_mask"] is mask                       # no aux / z loss: nothing to leave out
    # calculate_per_token_loss: the coefficients times aux_scale = N / (M * D * n_k) during the forward
    model = _moe_stub(calculate_per_token_loss=True, moe_z_loss_coeff=0.01)
    with masked_forward(model, {**mb, "empty_microbatches": False, "aux_scale": 0.5}):
        assert (model.config.moe_aux_loss_coeff, model.config.moe_z_loss_coeff) == (0.05, 0.005)
    assert (model.config.moe_aux_loss_coeff, model.config.moe_z_loss_coeff) == (0.1, 0.01)
    with masked_forward(model, {**mb, "no_real_token": True, "aux_scale": 0.0}):
        assert (model.config.moe_aux_loss_coeff, model.config.moe_z_loss_coeff) == (0.0, None)
    with pytest.raises(ValueError, match="padding tokens and TP x CP = 2 > 1"):
        with masked_forward(_moe_stub(calculate_per_token_loss=True, tensor_model_parallel_size=2), mb):
            pass


def test_aux_scale_restores_the_flag_off_weight(megatron_loss):
    """Under the flag, micro-batch k's aux_scale is N / (M * D * n_k): rows of 6, 6, 6 | 6, 6, 6 | 6 real
    tokens (the last micro-batch with two padding rows): N = 42, M = 3, D = 1 -> 42 / (3 * 18) and
    42 / (3 * 6); flag off 1.0; a micro-batch without a real token 0 either way."""
    _, batch = make_batch()
    cfg = config("token_sum")
    on = megatron_loss.prepare_microbatches(batch, cfg, 3, calculate_per_token_loss=True)
    assert [mb["aux_scale"] for mb in on] == pytest.approx([42 / 54, 42 / 54, 42 / 18], rel=1e-12)
    off = megatron_loss.prepare_microbatches(batch, cfg, 3)
    assert [mb["aux_scale"] for mb in off] == [1.0, 1.0, 1.0]
    token_mask = torch.ones(B, 6)
    token_mask[3:6] = 0
    on = megatron_loss.prepare_microbatches({**batch, "token_mask": token_mask}, cfg, 3, calculate_per_token_loss=True)
    assert [mb["aux_scale"] for mb in on] == pytest.approx([24 / 54, 0.0, 24 / 18], rel=1e-12)


def test_packing_rescales_aux_scale_to_the_packed_real_tokens(megatron_loss):
    """Packing keeps a row up to its last loss token, so the router of a packed micro-batch counts fewer
    real tokens n'_k than prepare_microbatches' n_k: aux_scale becomes N / (M * D * n'_k) (flag on), stays
    1 flag off, and is 0 for a pack without a real token."""
    from megatron_rl_agg.mcore.packing import pack_microbatches

    _, batch = make_batch()
    cfg = config("token_sum")
    for flag in (True, False):
        mbs = megatron_loss.prepare_microbatches(batch, cfg, 3, calculate_per_token_loss=flag)
        packed = pack_microbatches(mbs)
        for mb, pk in zip(mbs, packed):
            kept = int((~pk["padding_mask"][:, : pk["packed_layout"].num_real_tokens]).sum())
            assert 0 < kept < int((~mb["padding_mask"]).sum())       # the columns after the last loss token
            expected = float(mb["total_tokens"]) / (3 * 1 * kept) if flag else 1.0
            assert pk["aux_scale"] == pytest.approx(expected, rel=1e-12) and not pk["no_real_token"]
    token_mask, loss_mask = torch.ones(B, 6), batch["loss_mask"].clone()
    token_mask[3:], loss_mask[3:] = 0, 0              # micro-batches 2 and 3: padding only
    packed = pack_microbatches(megatron_loss.prepare_microbatches(
        {**batch, "token_mask": token_mask, "loss_mask": loss_mask}, cfg, 3, calculate_per_token_loss=True))
    assert [(pk["no_real_token"], pk["aux_scale"]) for pk in packed][1:] == [(True, 0.0)] * 2
