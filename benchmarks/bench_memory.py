"""Peak memory of the plugin's loss path against Megatron's plain cross-entropy loss.

The loss path is everything after the model's output layer: from the vocab-parallel logits ``[B, T, V]``
to the loss, and its backward down to ``dL/dlogits``. Any extra ``[B, T, V]``-sized tensor the loss keeps
or materializes shows up as a multiple of ``U = B * T * V * 4`` bytes (one fp32 copy of the logits), so
the configuration is chosen to make ``U`` dominate everything else (default B=2, T=512, V=32768:
U = 128 MiB). Keep ``U`` above 32 MiB on a CPU: glibc serves smaller blocks from its heap, which the
high-water mark below does not see being reused.

Two measurements per variant, each taken after the inputs (logits, batch) exist:

* ``peak``: the peak resident memory during forward + backward minus the resident memory before it. On a
  CPU this is the kernel's high-water mark ``VmHWM`` (reset through ``/proc/self/clear_refs`` before each
  variant); tensors of this size are mmap-ed by the allocator and returned on free, so the
  high-water mark follows tensor lifetimes. On a GPU it is ``torch.cuda.max_memory_allocated``.
* ``saved``: bytes of the distinct tensors autograd saves for the backward
  (``torch.autograd.graph.saved_tensors_hooks``), excluding the logits themselves.

Variants: ``plain`` (Megatron's ``vocab_parallel_cross_entropy`` + masked token mean, what
``GPTModel(..., labels=...)`` and pretrain_gpt do); ``plugin`` (token_mean, no KL, no entropy bonus:
the entropy is still computed for the metric, without gradient); ``plugin+kl`` (k3 KL, per-micro-batch
mean); ``plugin+entropy`` (entropy bonus with gradient); and, as a diagnostic, ``plugin-no-H-metric``:
``plugin`` with the entropy metric replaced by zeros.

    python benchmarks/bench_memory.py [--batch 2 --seq 512 --vocab 32768] [--json memory.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rl_agg.mcore import compat, cpu_mode  # noqa: E402
from megatron_rl_agg.core.config import LossConfig  # noqa: E402

VARIANTS = {
    "plain": None,
    "plugin": dict(loss_aggregation="token_mean"),
    "plugin+kl": dict(loss_aggregation="token_mean", kl_coef=0.01),
    "plugin+entropy": dict(loss_aggregation="token_mean", entropy_coef=0.01),
    # DIAGNOSTIC, not a configuration of the plugin: "plugin" with the entropy metric replaced by zeros,
    # to show which part of the loss path holds the extra [B, T, V] tensors.
    "plugin-no-H-metric": dict(loss_aggregation="token_mean"),
}


def _status_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMeter:
    """Peak memory above the level at ``start()``: GPU allocator stats, or the RSS high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")   # resets VmHWM to the current RSS (Linux >= 4.0)
            self.base = _status_mib("VmRSS")

    def peak(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return _status_mib("VmHWM") - self.base


class SavedBytes:
    """Sum of the distinct storages autograd saves for backward, minus the ones in ``exclude``."""

    def __init__(self, exclude: tuple) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    def mib(self) -> float:
        return sum(self.seen.values()) / 2**20


def run_variant(name: str, logits0: torch.Tensor, batch: dict, seq: int):
    """Forward + backward of one loss path on a fresh leaf copy of ``logits0``.

    Returns ``(peak MiB, saved MiB)``.
    """
    from megatron.core import tensor_parallel

    from megatron_rl_agg.mcore import logprobs, loss as megatron_loss
    from megatron_rl_agg.mcore.batch import prepare_microbatches

    logits = logits0.clone().requires_grad_(True)
    real_fused = megatron_loss.vocab_parallel_logprobs_and_entropy
    if name == "plugin-no-H-metric":   # log-probs from Megatron's cross entropy alone, entropy zeros
        megatron_loss.vocab_parallel_logprobs_and_entropy = lambda z, labels, **_: (
            logprobs.vocab_parallel_logprobs(z, labels), z.new_zeros(z.shape[:-1]))
    if name != "plain":
        cfg = LossConfig(max_response_length=seq, **VARIANTS[name])
        (micro_batch,) = prepare_microbatches(batch, cfg, micro_batch_size=batch["tokens"].shape[0])
        micro_batch = dict(micro_batch)
    meter = PeakMeter(logits.device)
    meter.start()
    saved = SavedBytes(exclude=(logits,))
    with saved.hooks:
        if name == "plain":
            # GPTModel.compute_language_model_loss: vocab_parallel_cross_entropy on the fp32 logits.
            per_token = tensor_parallel.vocab_parallel_cross_entropy(logits, batch["labels"])
            mask = batch["loss_mask"].float()
            loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        else:
            loss, _ = megatron_loss.loss_func(logits, micro_batch=micro_batch,
                                              loss_config=micro_batch["loss_config"])
    loss.backward()
    peak = meter.peak()
    megatron_loss.vocab_parallel_logprobs_and_entropy = real_fused
    del logits, loss
    return peak, saved.mib()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=3, help="runs per variant; the smallest peak is kept")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)

    compat.initialize_distributed()
    compat.initialize_model_parallel(1, 1)
    device = cpu_mode.device()
    B, T, V = args.batch, args.seq, args.vocab
    gen = torch.Generator().manual_seed(0)
    logits0 = torch.randn(B, T, V, generator=gen).to(device)
    labels = torch.randint(0, V, (B, T), generator=gen).to(device)
    loss_mask = (torch.rand(B, T, generator=gen) < 0.7).to(torch.int64).to(device)
    uniform = -torch.log(torch.tensor(float(V))).item()     # log-prob of a token under a uniform policy
    batch = {"tokens": labels.clone(), "labels": labels, "loss_mask": loss_mask,
             "advantages": torch.randn(B, generator=gen).to(device),
             "old_logprobs": torch.full((B, T), uniform, device=device),
             "ref_logprobs": torch.full((B, T), uniform - 0.1, device=device)}
    unit = B * T * V * 4 / 2**20
    results = {}
    for name in VARIANTS:
        runs = [run_variant(name, logits0, batch, T) for _ in range(args.repeats)]
        peak = min(r[0] for r in runs)
        saved = runs[-1][1]
        results[name] = {"peak_mib": peak, "peak_units": peak / unit, "saved_mib": saved,
                         "saved_units": saved / unit}
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "shape": [B, T, V], "unit_mib": unit, "variants": results}
    print(f"loss path, logits [B, T, V] = [{B}, {T}, {V}] fp32, U = one such tensor = {unit:.0f} MiB "
          f"({report['device']})")
    print(f"{'variant':<16} {'peak MiB':>9} {'peak / U':>9} {'saved MiB':>10} {'saved / U':>10}")
    for name, r in results.items():
        print(f"{name:<16} {r['peak_mib']:>9.0f} {r['peak_units']:>9.2f} {r['saved_mib']:>10.0f} "
              f"{r['saved_units']:>10.2f}")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
    compat.destroy_model_parallel()
    return report


if __name__ == "__main__":
    try:
        main()
    finally:
        compat.destroy_distributed()
