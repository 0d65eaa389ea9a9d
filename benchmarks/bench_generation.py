"""Tokens per second of on-policy generation: the KV cache against recomputing the prefix per token.

One process (gloo world of one, Megatron-Core on CPU, or one GPU), the demo model of
``configs/cpu_demo.yaml`` (2 layers, hidden 64, 4 heads, vocabulary 32), counting-task prompts of 3-5
tokens, ``--rows`` rows in micro-batches of ``--micro-batch-rows``. For each number of new tokens the
sequence length is ``max prompt + new - 1`` and EOS is never drawn (its Gumbel noise is -inf), so every
row generates exactly that many tokens; both paths draw the same tokens from the same noise (checked).
Reported: generated tokens per second (median of ``--repeats`` runs) and the speed-up.

    OMP_NUM_THREADS=1 python benchmarks/bench_generation.py [--new-tokens 8 64 256] [--rows 64]
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

from megatron_rl_agg.mcore import compat  # noqa: E402
from megatron_rl_agg.mcore.build import build_model  # noqa: E402
from megatron_rl_agg.mcore.spec import GPTSpec  # noqa: E402
from megatron_rl_agg.mcore.weights import init_weights  # noqa: E402
from megatron_rl_agg.trainer.rollout import generation, task  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--micro-batch-rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    compat.initialize_distributed()
    compat.initialize_model_parallel(tp=1, pp=1)
    counting = task.CountingTask()
    prompts = counting.sample_prompts(args.rows, torch.Generator().manual_seed(0))
    longest = max(len(p) for p in prompts)
    rows = []
    for new in args.new_tokens:
        seq = longest + new - 1
        spec = GPTSpec(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=32, max_seq_length=seq)
        chunks = build_model(spec)
        init_weights(chunks, seed=1)
        u = torch.rand(args.rows, new, spec.vocab_size, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
        noise = -torch.log(-torch.log(u.clamp(min=1e-300)))
        noise[..., task.EOS] = -float("inf")
        result, times = {}, {}
        for kv in (False, True):
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = generation.generate(chunks, prompts, noise, seq_length=seq, max_new_tokens=new,
                                          temperature=1.0, micro_batch_rows=args.micro_batch_rows,
                                          kv_cache=kv)
                runs.append(time.perf_counter() - start)
            result[kv], times[kv] = out, statistics.median(runs)
        if result[True] != result[False]:
            raise AssertionError(f"{new} new tokens: the cached path drew other tokens")
        assert all(len(r) == new for r, _ in result[True])
        tokens = args.rows * new
        row = {"new_tokens": new, "rows": args.rows, "seq_length": seq,
               "recompute_tok_s": tokens / times[False], "cached_tok_s": tokens / times[True],
               "speedup": times[False] / times[True], "recompute_s": times[False], "cached_s": times[True]}
        rows.append(row)
        print(f"{new:>4} new tokens  recompute {row['recompute_tok_s']:>9.0f} tok/s ({times[False]:.3f} s)  "
              f"cached {row['cached_tok_s']:>9.0f} tok/s ({times[True]:.3f} s)  "
              f"speed-up {row['speedup']:.1f}x",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    compat.destroy_model_parallel()


if __name__ == "__main__":
    main()
