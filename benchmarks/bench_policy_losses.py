"""Cost of the policy losses: CP traffic of the sequence-level ratio, and step time against ``ppo_clip``.

Two measurements, one real Megatron-Core GPT, the plugin's ``prepare_microbatches`` and ``forward_step``
through Megatron's schedule:

* ``--traffic`` (under torchrun, world size = the CP size): the bytes every rank moves over the CP group
  per optimizer step for ``gspo``, read from the traffic counter of ``parallel.dist``
  (``count_collectives``). GSPO's per-sequence mean log-ratio needs the row's numerator summed over the
  CP ranks: ``all_reduce_sum_grad``, ONE scalar per sequence forward and one backward (``b * 4`` bytes
  each per micro-batch of ``b`` rows: the float32 log-prob dtype). Against it, the
  peers' way: all-gather each rank's ``[b, S / cp]`` log-probs (forward) and reduce their gradient
  (backward), measured through the same counter with ``dist.all_gather_stacked`` on the same shard.
  The whole step's counted traffic is also given for ``ppo_clip`` and ``gspo`` (their difference is what
  the sequence ratio adds).

      torchrun --standalone --nproc-per-node 2 benchmarks/bench_policy_losses.py --traffic
      torchrun --standalone --nproc-per-node 4 benchmarks/bench_policy_losses.py --traffic

* ``--step-time`` (one process): for each registered loss, paired repeats of one ``ppo_clip`` step and
  one step of the loss, back to back with alternating order (as bench_step_overhead.py); the median of
  the per-repeat ratio ``t_loss / t_ppo_clip`` (both aggregated with the loss's paper mode) of the
  process CPU time (run with ``OMP_NUM_THREADS=1``;
  on a GPU the wall time).

      OMP_NUM_THREADS=1 python benchmarks/bench_policy_losses.py --step-time
      OMP_NUM_THREADS=1 python benchmarks/bench_policy_losses.py --step-time --losses cispo --repeats 41
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rl_agg.audit.batch import make_batch  # noqa: E402
from megatron_rl_agg.core.config import LossConfig  # noqa: E402
from megatron_rl_agg.core.policy_losses import POLICY_LOSSES, get_policy_loss  # noqa: E402
from megatron_rl_agg.mcore import compat, cpu_mode  # noqa: E402
from megatron_rl_agg.mcore.build import build_model, build_optimizer  # noqa: E402
from megatron_rl_agg.mcore.spec import GPTSpec  # noqa: E402
from megatron_rl_agg.mcore.weights import init_weights  # noqa: E402
from megatron_rl_agg.parallel import dist  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--traffic", action="store_true", help="CP traffic per step (torchrun, world = cp)")
    what.add_argument("--step-time", action="store_true", help="step-time ratio of each loss (1 process)")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-microbatches", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15, help="--step-time: timed pairs per loss")
    p.add_argument("--warmup", type=int, default=1, help="--step-time: untimed pairs per loss")
    p.add_argument("--losses", default=None,
                   help="--step-time: comma-separated registered losses to time against ppo_clip (default: all)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", dest="json_path", default=None)
    return p.parse_args(argv)


def _setup(args, cp: int):
    compat.initialize_model_parallel(1, 1, cp=cp, seed=args.seed)
    spec = GPTSpec(num_layers=args.num_layers, hidden_size=args.hidden_size,
                   num_attention_heads=args.num_attention_heads, vocab_size=args.vocab_size,
                   max_seq_length=args.seq_length)
    chunks = build_model(spec)
    init_weights(chunks, seed=args.seed)
    device = cpu_mode.device()
    rows = args.micro_batch_size * args.num_microbatches
    batch = make_batch(batch_size=rows, seq_length=args.seq_length, vocab_size=args.vocab_size, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    base = -torch.log(torch.tensor(float(args.vocab_size)))
    batch["old_logprobs"] = base + 0.1 * torch.randn(rows, args.seq_length, generator=gen)
    batch["ref_logprobs"] = base + 0.1 * torch.randn(rows, args.seq_length, generator=gen)
    batch.pop("group_sizes")
    return chunks, {k: v.to(device) for k, v in batch.items()}, device


def _config(args, loss: str, mode: str = None) -> LossConfig:
    """``loss`` aggregated with ``mode`` (default: the loss's paper mode)."""
    mode = mode or POLICY_LOSSES[loss].paper_mode
    return LossConfig(loss_aggregation=mode, policy_loss=loss, max_response_length=args.seq_length)


def _forward_backward(args, chunks, batch, cfg, cp_group=None):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rl_agg.mcore.batch import prepare_microbatches
    from megatron_rl_agg.mcore.loss import forward_step

    for chunk in chunks:
        chunk.zero_grad_buffer()
    mbs = prepare_microbatches(batch, cfg, args.micro_batch_size, cp_group=cp_group)
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(mbs), model=chunks,
                                num_microbatches=len(mbs), seq_length=args.seq_length,
                                micro_batch_size=args.micro_batch_size, forward_only=False)
    return mbs


def traffic(args) -> dict:
    """Per-rank bytes over the CP group per optimizer step (the counter's payload bytes)."""
    from megatron.core import parallel_state

    cp = torch.distributed.get_world_size()
    chunks, batch, device = _setup(args, cp)
    cp_group = parallel_state.get_context_parallel_group()
    out = {"cp": cp, "rows": args.micro_batch_size * args.num_microbatches, "seq_length": args.seq_length}
    for loss in ("ppo_clip", "gspo"):
        _forward_backward(args, chunks, batch, _config(args, loss), cp_group)   # warm-up
        with dist.count_collectives() as counted:
            _forward_backward(args, chunks, batch, _config(args, loss), cp_group)
        out[loss] = {"bytes": dict(counted.bytes), "calls": dict(counted.calls), "total_bytes": counted.total_bytes}
    # The peers' alternative: all-gather each micro-batch's [b, S / cp] float32 log-probs over the CP group
    # (forward) and reduce the gradient of the gathered copy back (backward), through the same counter.
    shard = (args.micro_batch_size, args.seq_length // cp)
    with dist.count_collectives() as gathered:
        for _ in range(args.num_microbatches):
            logp = torch.zeros(shard, dtype=torch.float32, device=device, requires_grad=True)
            dist.all_gather_stacked(logp, cp_group).sum().backward()
    out["all_gather_logprobs"] = {"bytes": dict(gathered.bytes), "total_bytes": gathered.total_bytes}
    out["sequence_scalars_bytes"] = out["gspo"]["bytes"].get("all_reduce_sum_grad", 0)
    compat.destroy_model_parallel()
    return out


def _losses(args) -> list:
    """The losses ``--losses`` names (canonical names; an unknown one lists the valid ones), ppo_clip dropped."""
    names = POLICY_LOSSES if args.losses is None else [get_policy_loss(n).name for n in args.losses.split(",")]
    return [n for n in dict.fromkeys(names) if n != "ppo_clip"]


def step_time(args) -> dict:
    """Median over paired repeats of ``t_loss / t_ppo_clip`` for every registered loss."""
    chunks, batch, device = _setup(args, 1)
    optimizer = build_optimizer(chunks, lr=1e-6)
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def step(loss: str, mode: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        optimizer.zero_grad()
        _forward_backward(args, chunks, batch, _config(args, loss, mode))
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - t0

    out = {"clock": "wall" if device.type == "cuda" else "cpu", "ratio": {}}
    for loss in _losses(args):
        ratios, mode = [], POLICY_LOSSES[loss].paper_mode      # both sides aggregated with the loss's mode
        for r in range(args.warmup + args.repeats):
            order = ("ppo_clip", loss) if r % 2 == 0 else (loss, "ppo_clip")
            t = {name: step(name, mode) for name in order}
            if r >= args.warmup:
                ratios.append(t[loss] / t["ppo_clip"])
        out["ratio"][loss] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        print(f"{loss:<11} / ppo_clip ({POLICY_LOSSES[loss].paper_mode}): median {statistics.median(ratios):.4f} "
              f"(min {min(ratios):.4f}, max {max(ratios):.4f}, {args.repeats} pairs)", flush=True)
    compat.destroy_model_parallel()
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    compat.initialize_distributed()
    if args.traffic:
        result = traffic(args)
        if torch.distributed.get_rank() == 0:
            print(json.dumps(result, indent=1), flush=True)
    else:
        if torch.distributed.get_world_size() != 1:
            raise SystemExit(f"--step-time runs in one process, got world size {torch.distributed.get_world_size()}")
        result = step_time(args)
    result["config"] = vars(args)
    if args.json_path and torch.distributed.get_rank() == 0:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    try:
        main()
    finally:
        compat.destroy_distributed()
