"""torchrun worker (2 processes, gloo): KV-cached generation draws the recompute path's tokens.

    torchrun --nproc_per_node 2 tests/trainer/worker_generation.py OUT_DIR

For each layout (DP2 with TP1, TP2, PP2, PP2 x VPP2), in one process group: a 4-layer GPT with
layout-independent weights (``init_weights``), 12 counting-task prompts of 3-5 tokens, fixed Gumbel noise
and temperature 1.5 (so that many different tokens are drawn), ``generate`` once with ``kv_cache=False``
(the whole prefix recomputed per token) and once with the KV cache. Every call of ``sample_tokens`` is
recorded, so the worker compares the logits each row's token ``j`` was drawn from on both paths. Rank 0
saves, per layout: both paths' responses and the largest logit difference.
"""

import sys

import torch
import torch.distributed as torch_dist

from megatron_rl_agg.mcore import compat
from megatron_rl_agg.mcore.build import build_model
from megatron_rl_agg.mcore.spec import GPTSpec
from megatron_rl_agg.mcore.weights import init_weights
from megatron_rl_agg.trainer.rollout import generation, task
from tests.torchrun_utils import save_result

LAYOUTS = {"tp1": dict(tp=1, pp=1), "tp2": dict(tp=2, pp=1), "pp2": dict(tp=1, pp=2),
           "pp2vpp2": dict(tp=1, pp=2, vpp=2)}
SEQ, VOCAB, ROWS, MICRO = 24, 32, 12, 3


def record_logits(lengths, kv_cache):
    """Patch generation.sample_tokens; returns ``{(row, j): logits [V]}`` filled as the draws happen."""
    seen, passes = {}, [0]
    real = generation.sample_tokens
    first = min(lengths) - 1

    def sample(logits, noise, temperature):
        k = passes[0]
        passes[0] += 1
        for i in range(logits.shape[0]):
            j = (first + k - (lengths[i] - 1)) if kv_cache else k
            if 0 <= j:
                seen[(i, j)] = logits[i].clone()
        return real(logits, noise, temperature)

    generation.sample_tokens = sample
    return seen, lambda: setattr(generation, "sample_tokens", real)


def run(argv):
    """``argv = [out_dir]`` in a process group that is up (``tests/worker_jobs.py``)."""
    out_dir = argv[0]
    rank = torch_dist.get_rank()
    counting = task.CountingTask()
    g = torch.Generator().manual_seed(5)
    prompts = counting.sample_prompts(ROWS, g)
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) > 1, lengths          # rows start decoding at different passes
    max_new = SEQ + 1 - max(lengths)
    noise = -torch.log(-torch.log(torch.rand(ROWS, max_new, VOCAB, generator=g, dtype=torch.float64)
                                  .clamp(min=1e-300)))
    for name, layout in LAYOUTS.items():
        compat.initialize_model_parallel(**layout)
        spec = GPTSpec(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                       max_seq_length=SEQ)
        chunks = build_model(spec)
        init_weights(chunks, seed=11)
        result = {}
        for kv in (False, True):
            seen, restore = record_logits(lengths, kv)
            try:
                out = generation.generate(chunks, prompts, noise, seq_length=SEQ, max_new_tokens=max_new,
                                          temperature=1.5, micro_batch_rows=MICRO, kv_cache=kv)
            finally:
                restore()
            result[kv] = (out, seen)
            if not all(c.training for c in chunks):
                raise AssertionError(f"{name}: generate(kv_cache={kv}) left a chunk in eval mode")
        (ref, ref_seen), (got, got_seen) = result[False], result[True]
        drawn = [(i, j) for i, (resp, _) in enumerate(ref) for j in range(len(resp))]
        diff = torch.zeros(())
        if ref_seen:          # the last pipeline stage samples; the others only receive the tokens
            diff = torch.stack([(got_seen[key] - ref_seen[key]).abs().max() for key in drawn]).max().float()
        sampled = torch.tensor(float(bool(ref_seen)))
        torch_dist.all_reduce(diff, op=torch_dist.ReduceOp.MAX)     # to rank 0 from the sampling stage
        torch_dist.all_reduce(sampled)
        if sampled < 1:
            raise AssertionError(f"{name}: no rank recorded a draw")
        if rank == 0:
            save_result(out_dir, name, {"recompute": [r for r, _ in ref], "cached": [r for r, _ in got],
                                        "finish": [[f for _, f in ref], [f for _, f in got]],
                                        "max_logit_diff": diff, "max_new": torch.tensor(max_new)})
        elif ref != got:
            raise AssertionError(f"{name}: rank {rank} tokens differ between the paths")
        compat.destroy_model_parallel()


def main():
    compat.initialize_distributed()
    try:
        run(sys.argv[1:])
    finally:
        compat.destroy_distributed()


if __name__ == "__main__":
    main()
