"""Megatron-Core's fp32 log-probs of given token sequences for Hugging Face models, at TP1 and TP2, in one
torchrun of 2 processes (gloo, CPU); rank 0 writes them as JSON for tests/engine/test_vllm.py.

    torchrun --nproc_per_node 2 tests/engine/megatron_logprobs.py OUT.json SEQS.json MODEL_DIR [MODEL_DIR ...]

``SEQS.json``: ``[[ids...], ...]``. ``OUT.json``: ``{"<model dir>": {"1": [[...], ...], "2": [...]}}`` where
entry ``[tp][s]`` is ``log softmax(z)[x_t]`` for ``t = 1 .. len - 1`` of sequence ``s`` (TP1 runs as DP2:
both ranks compute every sequence).
"""

from __future__ import annotations

import json
import sys

import torch


def main(out: str, seqs_path: str, models: list[str]) -> None:
    from megatron_rl_agg.hf.load import HFCheckpoint, gpt_spec_from_hf, load_hf_weights
    from megatron_rl_agg.mcore import compat, forward
    from megatron_rl_agg.mcore.build import build_model

    seqs = json.load(open(seqs_path))
    seq_length = max(len(s) for s in seqs) - 1
    rank, _ = compat.initialize_distributed()
    result = {}
    try:
        for tp in (1, 2):
            compat.initialize_model_parallel(tp=tp, pp=1)
            for path in models:
                ckpt = HFCheckpoint(path)
                chunks = build_model(gpt_spec_from_hf(ckpt.arch, tp=tp, max_seq_length=seq_length))
                load_hf_weights(chunks, ckpt)
                tokens = torch.zeros(len(seqs), seq_length, dtype=torch.int64)
                labels = torch.zeros(len(seqs), seq_length, dtype=torch.int64)
                for i, s in enumerate(seqs):
                    tokens[i, : len(s) - 1] = torch.tensor(s[:-1])
                    labels[i, : len(s) - 1] = torch.tensor(s[1:])
                lp = forward.compute_logprobs(chunks, tokens, labels, 1, temperature=1.0)
                result.setdefault(path, {})[str(tp)] = [lp[i, : len(s) - 1].tolist() for i, s in enumerate(seqs)]
            compat.destroy_model_parallel()
        if rank == 0:
            with open(out, "w") as fh:
                json.dump(result, fh)
    finally:
        compat.destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
