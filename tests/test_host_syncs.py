"""Device-to-host reads inside ``loss_func``: none per micro-batch once the mini-batch is prepared, on the
default path (``prepare_microbatches`` without ``vocab_size``) as with it, every label still checked.

On a GPU every read of a device value by the host (``item``, ``bool``/``int``/``float`` of a tensor,
``tolist``, and ops whose output size depends on the data: ``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``) waits for the device and stalls the pipeline schedule. On a CPU nothing
stalls, so the reads are counted instead: :class:`HostReads` sees every aten op (including those run by
``autograd.Function`` forwards and by C++ conversions such as ``bool(t)``, which call
``aten::_local_scalar_dense``) and patches the two conversions that bypass the dispatcher.
"""

import types
from unittest import mock

import pytest
import torch
import torch.utils._python_dispatch

from megatron_rl_agg.mcore import compat
from megatron_rl_agg.core.aggregation import LOSS_AGGREGATIONS
from megatron_rl_agg.core.config import LossConfig

B, S, V = 7, 6, 11
GROUP_SIZES = [3, 2, 2]
ROW_TOKENS = [5, 2, 0, 4, 1, 3, 5]
MICRO_BATCH = 3          # three micro-batches (3 + 3 + 1 real rows)

_aten = torch.ops.aten
# ops that read a device value to the host (scalar conversion) or size their output from the data
_SYNC_OPS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
             _aten.unique_consecutive.default, _aten._unique2.default, _aten.unique_dim.default,
             _aten.repeat_interleave.Tensor}


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts device-to-host reads while active: ``reads`` lists ``(op, count)`` in order."""

    def __init__(self):
        super().__init__()
        self.reads = []
        self._patches = []

    def _note(self, name):
        self.reads.append(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS:
            self._note(str(func))
        elif func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self._note(f"{func} with a boolean mask")
        return func(*args, **kwargs)

    def __enter__(self):
        for name in ("tolist", "numpy"):
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, _name=name, **k):
                self._note(f"Tensor.{_name}")
                return _real(t, *a, **k)

            patch = mock.patch.object(torch.Tensor, name, counted)
            patch.start()
            self._patches.append(patch)
        return super().__enter__()

    def __exit__(self, *exc):
        for patch in self._patches:
            patch.stop()
        return super().__exit__(*exc)


@pytest.fixture(scope="module")
def megatron_loss():
    compat.initialize_distributed()
    compat.initialize_model_parallel(tp=1, pp=1)
    from megatron_rl_agg.mcore import batch, loss
    yield types.SimpleNamespace(prepare_microbatches=batch.prepare_microbatches, loss_func=loss.loss_func)
    compat.destroy_model_parallel()


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, S)
    for i, k in enumerate(ROW_TOKENS):
        mask[i, S - 1 - k: S - 1] = 1
    labels = torch.randint(0, V, (B, S), generator=g)
    batch = dict(tokens=torch.randint(0, V, (B, S), generator=g), labels=labels, loss_mask=mask,
                 advantages=torch.randn(B, generator=g), old_logprobs=-torch.rand(B, S, generator=g) - 1.5,
                 ref_logprobs=-torch.rand(B, S, generator=g) - 1.5,
                 group_ids=torch.repeat_interleave(torch.arange(3), torch.tensor(GROUP_SIZES)))
    return torch.randn(B, S, V, generator=g), batch


CASES = [LossConfig(loss_aggregation=m, max_response_length=S, kl_coef=0.1, entropy_coef=0.01)
         for m in LOSS_AGGREGATIONS] + [
    LossConfig(loss_aggregation="prompt_mean", kl_coef=0.2, kl_aggregation="token_mean", entropy_coef=0.05,
               entropy_aggregation="prompt_mean", dual_clip_c=2.0),
    LossConfig(loss_aggregation="token_mean", entropy_coef=0.0),
    # off-policy correction: weights, self-normalization and survivors prepared once; metrics in loss_func
    LossConfig(loss_aggregation="seq_mean_token_mean", is_level="geometric", is_mode="mask", is_low=0.5,
               is_high=2.0, is_veto=0.1, is_denominator="survivors", is_self_normalize=True),
]


def run_loss(module, cfg, vocab_size, per_token=False):
    """prepare_microbatches once, then loss_func per micro-batch; returns the reads inside loss_func."""
    logits, batch = make_batch()
    if cfg.is_level != "off":
        shift = torch.rand(B, S, generator=torch.Generator().manual_seed(1))
        batch["behaviour_logprobs"] = batch["old_logprobs"] - 0.3 * shift
    mbs = module.prepare_microbatches(batch, cfg, MICRO_BATCH, vocab_size=vocab_size,
                                      calculate_per_token_loss=per_token)
    assert len(mbs) == 3
    reads, losses = [], []
    for k, mb in enumerate(mbs):
        rows = logits[k * MICRO_BATCH:(k + 1) * MICRO_BATCH]
        rows = torch.cat([rows, rows.new_zeros(MICRO_BATCH - rows.shape[0], S, V)]).requires_grad_(True)
        with HostReads() as counter:
            loss = module.loss_func(rows * 1.0, micro_batch=mb, loss_config=cfg)[0]
        reads.append(counter.reads)
        loss.backward()
        losses.append(loss.detach())
    return reads, losses


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.loss_aggregation}-{c.kl_aggregation}-"
                                                     f"{c.entropy_aggregation}-{c.entropy_coef}")
def test_no_host_reads_in_loss_func(megatron_loss, cfg):
    # the default path: prepare_microbatches without vocab_size
    reads, losses = run_loss(megatron_loss, cfg, vocab_size=None)
    assert reads == [[], [], []]
    reads_given, losses_given = run_loss(megatron_loss, cfg, vocab_size=V)
    assert reads_given == [[], [], []]
    torch.testing.assert_close(torch.stack(losses), torch.stack(losses_given), rtol=0, atol=0)


@pytest.mark.parametrize("vocab_size", [None, V])
def test_no_host_reads_with_per_token_loss(megatron_loss, vocab_size):
    """Megatron's 3-tuple contract (calculate_per_token_loss): the same, no read per micro-batch."""
    cfg = LossConfig(loss_aggregation="seq_mean_token_mean", kl_coef=0.1, entropy_coef=0.01)
    reads, _ = run_loss(megatron_loss, cfg, vocab_size=vocab_size, per_token=True)
    assert reads == [[], [], []]


def test_counter_sees_each_kind_of_read():
    t = torch.tensor([0.0, 2.0, 3.0])
    with HostReads() as counter:
        t.sum().item()
        bool(t.any())
        float(t[0])
        t.tolist()
        t[t > 1].sum()
        torch.nonzero(t)
    assert len(counter.reads) >= 6, counter.reads
    with HostReads() as counter:
        torch.where(t > 1, t, 0.0).sum()
    assert counter.reads == []


def _with_bad_label(batch, bad):
    labels = batch["labels"].clone()
    labels[5, 1] = bad           # in the second micro-batch
    return {**batch, "labels": labels}


@pytest.mark.parametrize("bad", [V, V + 7, -1])
def test_bad_labels_raise_from_prepare_with_vocab_size(megatron_loss, bad):
    _, batch = make_batch()
    cfg = LossConfig(loss_aggregation="token_mean")
    with pytest.raises(ValueError, match=rf"label id {bad} is outside the vocabulary \[0, {V}\)"):
        megatron_loss.prepare_microbatches(_with_bad_label(batch, bad), cfg, MICRO_BATCH, vocab_size=V)
    with pytest.raises(ValueError, match="vocab_size must be a positive int or None, got 0"):
        megatron_loss.prepare_microbatches(batch, cfg, MICRO_BATCH, vocab_size=0)


@pytest.mark.parametrize("bad", [V, V + 7, -1])
def test_bad_labels_raise_from_loss_func_without_a_read(megatron_loss, bad):
    """The default path: the label range is read once with the micro-batch count, and every micro-batch's
    loss_func (the bad label sits in the second) refuses it from host ints, reading nothing."""
    logits, batch = make_batch()
    cfg = LossConfig(loss_aggregation="token_mean")
    mbs = megatron_loss.prepare_microbatches(_with_bad_label(batch, bad), cfg, MICRO_BATCH)
    assert mbs[0]["label_range"] == (min(bad, 0), max(bad, int(batch["labels"].max())))
    for k, mb in enumerate(mbs):
        rows = logits[k * MICRO_BATCH:(k + 1) * MICRO_BATCH].clone()
        rows = torch.cat([rows, rows.new_zeros(MICRO_BATCH - rows.shape[0], S, V)])
        with HostReads() as counter, pytest.raises(
                ValueError, match=rf"label id {bad} is outside the vocabulary \[0, {V}\) \(vocab shard {V} "
                                  r"x tensor-parallel size 1\)"):
            megatron_loss.loss_func(rows, micro_batch=mb, loss_config=cfg)
        assert counter.reads == []


def test_label_range_costs_no_read_of_its_own(megatron_loss):
    """The range rides on the all-reduce of the micro-batch count: with or without vocab_size,
    prepare_microbatches reads the device as often as before the range existed (one tolist)."""
    _, batch = make_batch()
    cfg = LossConfig(loss_aggregation="token_mean")
    counts = []
    for vocab_size in (None, V):
        with HostReads() as counter:
            megatron_loss.prepare_microbatches(batch, cfg, MICRO_BATCH, vocab_size=vocab_size)
        counts.append(counter.reads)
    assert counts[0] == counts[1]
    assert counts[0].count("Tensor.tolist") == 1


def test_loss_func_refuses_a_different_vocabulary(megatron_loss):
    logits, batch = make_batch()
    cfg = LossConfig(loss_aggregation="token_mean")
    mb = megatron_loss.prepare_microbatches(batch, cfg, MICRO_BATCH, vocab_size=V + 1)[0]
    with pytest.raises(ValueError, match=rf"checked against vocab_size={V + 1} .* cover {V} ids"):
        megatron_loss.loss_func(logits[:MICRO_BATCH].clone(), micro_batch=mb, loss_config=cfg)


def test_logprob_checks_add_no_read_to_prepare_microbatches(megatron_loss):
    """The behaviour / reference log-prob checks ride on the one all-reduce of prepare_microbatches: the
    reads with both log-probs checked equal those without any (per mini-batch, none per micro-batch)."""
    cfg = LossConfig(loss_aggregation="token_mean", kl_coef=0.1)
    _, batch = make_batch()
    with HostReads() as checked:
        megatron_loss.prepare_microbatches(batch, cfg, MICRO_BATCH)
    with HostReads() as unchecked:
        megatron_loss.prepare_microbatches({**batch, "old_logprobs": None},
                                           LossConfig(loss_aggregation="token_mean"), MICRO_BATCH)
    assert checked.reads == unchecked.reads and len(checked.reads) <= 3


@pytest.mark.parametrize("name", ["gspo", "gspo_token", "gmpo", "cispo", "sapo", "dppo_tv", "dppo_kl"])
def test_no_host_reads_for_every_policy_loss(megatron_loss, name):
    """The sequence-level means (a row sum and a division by the prepared full-row counts) and every
    registered loss read nothing back from the device per micro-batch."""
    cfg = LossConfig(loss_aggregation="seq_mean_token_mean", policy_loss=name, kl_coef=0.1)
    reads, losses = run_loss(megatron_loss, cfg, vocab_size=V)
    assert reads == [[], [], []]
    assert all(torch.isfinite(x) for x in losses)
