"""Step-time overhead of the plugin's loss against Megatron's plain token-mean loss.

One process, one real Megatron-Core GPT model, the same mini-batch for both variants. A "step" is what an
RL trainer does per optimizer step: zero the gradient buffers, one forward-backward over ``M``
micro-batches with Megatron's schedule, and the optimizer step. The variants differ only in the loss path:

* ``plain``:  ``model(tokens, positions, labels=labels)`` returns Megatron's per-token cross entropy
  (computed inside the output layer) and the loss function returns the micro-batch token mean, the way
  Megatron-LM's ``pretrain_gpt.py`` does;
* ``plugin``: ``prepare_microbatches`` (global weights, once per step) and ``megatron_loss.forward_step``,
  whose loss function computes vocab-parallel log-probs and entropy from the logits, the PPO clipped
  surrogate, and optionally the KL term.

Paired runs: each repeat times one plugin step and one plain step back to back, alternating which goes
first, so slow drifts of the machine (other processes, thermal state) cancel in the per-repeat ratio
``t_plugin / t_plain``. Reported: min / median / max of that ratio, and the median step times. Two clocks
are read: wall time, and on the CPU also the process's CPU time (``time.process_time``), which other
processes competing for the cores do not inflate; run single-threaded (``OMP_NUM_THREADS=1``) so that
CPU time is also the work done. The CPU-time ratio is the headline figure on a CPU, wall time on a GPU.

    python benchmarks/bench_step_overhead.py                       # CPU: hidden 512, seq 512, 1 process
    python benchmarks/bench_step_overhead.py --kl-coef 0.01 --entropy-coef 0.001 \
        --loss-aggregation seq_mean_token_mean
    python benchmarks/bench_step_overhead.py --json step_overhead.json

On a GPU the same command runs on the current CUDA device (times are taken after a synchronize).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rl_agg.mcore import compat, cpu_mode  # noqa: E402
from megatron_rl_agg.audit.batch import make_batch  # noqa: E402
from megatron_rl_agg.core.config import LossConfig  # noqa: E402
from megatron_rl_agg.mcore.build import build_model, build_optimizer  # noqa: E402
from megatron_rl_agg.mcore.spec import GPTSpec  # noqa: E402
from megatron_rl_agg.mcore.weights import init_weights  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--num-microbatches", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="timed (plugin, plain) pairs")
    p.add_argument("--warmup", type=int, default=2, help="untimed pairs first")
    p.add_argument("--loss-aggregation", default="token_mean")
    p.add_argument("--kl-coef", type=float, default=0.0)
    p.add_argument("--entropy-coef", type=float, default=0.0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--skip-entropy-metric", action="store_true",
                   help="DIAGNOSTIC: log-probs from Megatron's cross entropy alone, the entropy metric "
                        "replaced by zeros (only with --entropy-coef 0), to measure what that metric costs")
    p.add_argument("--is-level", default="off",
                   help="off-policy correction (docs/off_policy.md): with a level other than off the batch gets "
                        "behaviour log-probs and the baseline ('plain') becomes the plugin with the correction off")
    p.add_argument("--is-mode", default="truncate")
    p.add_argument("--is-self-normalize", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", dest="json_path", default=None)
    return p.parse_args(argv)


def plain_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron-LM pretrain_gpt style: per-token losses [b, s] -> (sum, num_tokens, report)."""
    losses = output_tensor.float()
    mask = loss_mask.float()
    total = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return total, num_tokens, {"lm loss": torch.stack([total.detach(), num_tokens.detach().float()])}


def plain_forward_step(data_iterator, model):
    mb = next(data_iterator)
    output = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
    return output, functools.partial(plain_loss_func, mb["loss_mask"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    args = parse_args(argv)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rl_agg.mcore.batch import prepare_microbatches
    from megatron_rl_agg.mcore.loss import forward_step

    if args.skip_entropy_metric:
        if args.entropy_coef != 0:
            raise SystemExit("--skip-entropy-metric needs --entropy-coef 0 "
                             "(the entropy then has no gradient)")
        from megatron_rl_agg.mcore import logprobs, loss as megatron_loss

        # log-probs from Megatron's cross entropy alone, entropy replaced by zeros
        megatron_loss.vocab_parallel_logprobs_and_entropy = lambda logits, labels, **_: (
            logprobs.vocab_parallel_logprobs(logits, labels), logits.new_zeros(logits.shape[:-1]))
    compat.initialize_distributed()
    compat.initialize_model_parallel(1, 1, seed=args.seed)
    spec = GPTSpec(num_layers=args.num_layers, hidden_size=args.hidden_size,
                   num_attention_heads=args.num_attention_heads, vocab_size=args.vocab_size,
                   max_seq_length=args.seq_length, bf16=args.bf16)
    chunks = build_model(spec)
    init_weights(chunks, seed=args.seed)
    optimizer = build_optimizer(chunks, lr=1e-6)
    device = cpu_mode.device()

    rows = args.micro_batch_size * args.num_microbatches
    batch = make_batch(batch_size=rows, seq_length=args.seq_length, vocab_size=args.vocab_size,
                       seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    base = -torch.log(torch.tensor(float(args.vocab_size)))
    batch["old_logprobs"] = base + 0.1 * torch.randn(rows, args.seq_length, generator=gen)
    batch["ref_logprobs"] = base + 0.1 * torch.randn(rows, args.seq_length, generator=gen)
    batch.pop("group_sizes")
    correction = args.is_level != "off"
    if correction:
        batch["behaviour_logprobs"] = batch["old_logprobs"] + 0.2 * torch.randn(rows, args.seq_length, generator=gen)
    batch = {k: v.to(device) for k, v in batch.items()}
    cfg_off = LossConfig(loss_aggregation=args.loss_aggregation, kl_coef=args.kl_coef,
                         entropy_coef=args.entropy_coef, max_response_length=args.seq_length)
    cfg = LossConfig(**{**vars(cfg_off), "is_level": args.is_level, "is_mode": args.is_mode,
                        "is_low": 0.5, "is_self_normalize": args.is_self_normalize})
    batch_off = {k: v for k, v in batch.items() if k != "behaviour_logprobs"}
    positions = torch.arange(args.seq_length, device=device).expand(args.micro_batch_size, -1)
    plain_mbs = [{"tokens": batch["tokens"][k:k + args.micro_batch_size],
                  "labels": batch["labels"][k:k + args.micro_batch_size],
                  "loss_mask": batch["loss_mask"][k:k + args.micro_batch_size], "position_ids": positions}
                 for k in range(0, rows, args.micro_batch_size)]
    forward_backward = get_forward_backward_func()

    def step(variant: str) -> tuple[float, float]:
        _sync(device)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        if variant == "plugin":
            mbs = prepare_microbatches(batch, cfg, args.micro_batch_size)
            fn = forward_step
        elif correction:      # baseline: the plugin with the correction off
            mbs = prepare_microbatches(batch_off, cfg_off, args.micro_batch_size)
            fn = forward_step
        else:
            mbs, fn = plain_mbs, plain_forward_step
        forward_backward(forward_step_func=fn, data_iterator=iter(mbs), model=chunks,
                         num_microbatches=len(mbs), seq_length=args.seq_length,
                         micro_batch_size=args.micro_batch_size, forward_only=False)
        optimizer.step()
        _sync(device)
        return time.perf_counter() - wall0, time.process_time() - cpu0

    clocks = ("wall", "cpu")
    times = {(v, c): [] for v in ("plugin", "plain") for c in clocks}
    ratios = {c: [] for c in clocks}
    for r in range(args.warmup + args.repeats):
        order = ("plugin", "plain") if r % 2 == 0 else ("plain", "plugin")
        t = {v: step(v) for v in order}
        if r < args.warmup:
            continue
        for i, c in enumerate(clocks):
            for v in order:
                times[(v, c)].append(t[v][i])
            ratios[c].append(t["plugin"][i] / t["plain"][i])
        (pw, pc), (bw, bc) = t["plugin"], t["plain"]
        print(f"repeat {r - args.warmup:2d}: wall plugin {pw:.3f} s plain {bw:.3f} s "
              f"ratio {ratios['wall'][-1]:.4f} | cpu plugin {pc:.3f} s plain {bc:.3f} s "
              f"ratio {ratios['cpu'][-1]:.4f}", flush=True)

    def summary(values):
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    headline = "wall" if device.type == "cuda" else "cpu"
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "config": vars(args),
        "tokens_per_step": rows * args.seq_length,
        "headline_clock": headline,
        "median_step_s": {f"{v}/{c}": statistics.median(ts) for (v, c), ts in times.items()},
        "ratio": {c: summary(rs) for c, rs in ratios.items()},
        "ratios": ratios,
    }
    for c in clocks:
        med = result["median_step_s"]
        print(f"{c:>4} time, median of {args.repeats}: plugin {med['plugin/' + c]:.3f} s, "
              f"plain {med['plain/' + c]:.3f} s; ratio plugin/plain: "
              "min {min:.4f}  median {median:.4f}  max {max:.4f}".format(**result["ratio"][c])
              + ("   <- headline" if c == headline else ""))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    compat.destroy_model_parallel()
    return result


if __name__ == "__main__":
    try:
        main()
    finally:
        compat.destroy_distributed()
