"""The audit's fixed RL mini-batch (:func:`make_batch`): every count the aggregation modes depend on differs
across rows, micro-batches and ranks."""

from __future__ import annotations

import torch

__all__ = ["make_batch"]


def make_batch(*, batch_size: int, seq_length: int, vocab_size: int, seed: int) -> dict:
    """A deterministic RL mini-batch that exercises every count the modes depend on.

    Rows hold a prompt (2 to S/4 tokens) and a response of 1 to ``S - prompt`` tokens, so token counts per
    row, micro-batch and rank all differ. Prompt groups (1 to 5 rows, stretched where needed) straddle
    the rank boundaries of dp2 and dp4 splits; one row is fully masked inside the largest live group and
    the last group is fully masked (dead rows and a dead group must not count). Advantages are group-normalized rewards.

    Returns (CPU tensors): ``tokens``, ``labels``, ``loss_mask`` ``[B, S]``; ``advantages`` ``[B]``;
    ``group_ids`` ``[B]`` int64; ``group_sizes`` (list of ints).
    """
    from megatron_rl_agg.parallel.advantages import normalize_advantages

    gen = torch.Generator().manual_seed(seed)
    B, S = batch_size, seq_length
    tokens = torch.randint(0, vocab_size, (B, S), generator=gen)
    labels = torch.cat([tokens[:, 1:], torch.zeros(B, 1, dtype=tokens.dtype)], dim=1)   # next token
    loss_mask = torch.zeros(B, S, dtype=torch.int64)
    for i in range(B):
        prompt = int(torch.randint(2, max(3, S // 4 + 1), (1,), generator=gen))
        response = int(torch.randint(1, S - prompt + 1, (1,), generator=gen))
        # label position t predicts token t + 1: the response tokens [prompt, prompt + response).
        loss_mask[i, prompt - 1: prompt - 1 + response] = 1
    # Group sizes 1..5, stretched so that no group ends exactly at B/4, B/2 or 3B/4: at dp2 / dp4 (and
    # many micro-batch splits) some group continues on the next rank or micro-batch.
    cuts = {B // 4, B // 2, 3 * B // 4} - {0, B}
    sizes, start = [], 0
    while start < B:
        size = min(B - start, int(torch.randint(1, 6, (1,), generator=gen)))
        while start + size in cuts:
            size += 1
        sizes.append(size)
        start += size
    group_ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    if len(sizes) > 1:
        loss_mask[group_ids == len(sizes) - 1] = 0          # a dead group
    live = range(len(sizes) - 1) if len(sizes) > 1 else range(1)
    big = max(live, key=lambda g: sizes[g])
    if sizes[big] > 1:
        loss_mask[int((group_ids == big).nonzero()[0])] = 0  # a dead row in a live group
    rewards = torch.randn(B, generator=gen, dtype=torch.float64)
    advantages = normalize_advantages(rewards, group_sizes=sizes).to(torch.float32)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "advantages": advantages,
            "group_ids": group_ids, "group_sizes": sizes}
