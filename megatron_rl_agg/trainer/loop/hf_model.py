"""A Hugging Face checkpoint as the trainer's model: its spec, the initial weights, and the export.

* :func:`hf_model_spec` / :func:`load_hf_policy`: ``--hf-checkpoint`` as the architecture and the initial
  weights of the policy (and, with ``--kl-coef > 0``, of the reference); each rank reads only its slices.
* :func:`save_hf`: ``--save-hf`` (:mod:`megatron_rl_agg.hf.export`), after the last step and every
  ``--save-interval`` steps.
* :func:`export_checkpoint`: ``megatron-rl-agg export-hf``, a trainer checkpoint -> a Hugging Face directory.

The checkpoint is read once per process (:func:`hf_checkpoint`); transformers & co. only load when used.
"""

from __future__ import annotations

import argparse
import functools
from typing import Optional

from megatron_rl_agg.trainer.loop import checkpoint

__all__ = ["hf_checkpoint", "hf_model_spec", "load_hf_policy", "save_hf", "export_checkpoint"]


@functools.lru_cache(maxsize=2)
def hf_checkpoint(path: str):
    from megatron_rl_agg.hf.load import HFCheckpoint

    return HFCheckpoint(path)


def hf_model_spec(args):
    from megatron_rl_agg.hf.load import gpt_spec_from_hf

    return gpt_spec_from_hf(hf_checkpoint(args.hf_checkpoint).arch, tp=args.tensor_model_parallel_size,
                            max_seq_length=args.seq_length, bf16=args.bf16)


def load_hf_policy(chunks: list, args) -> None:
    from megatron_rl_agg.hf.load import load_hf_weights

    load_hf_weights(chunks, hf_checkpoint(args.hf_checkpoint))


def save_hf(chunks: list, args, out_dir: Optional[str] = None) -> Optional[str]:
    """Export ``chunks`` to ``--save-hf`` (every rank calls; rank 0 writes)."""
    from megatron_rl_agg.hf.export import export_hf

    ckpt = hf_checkpoint(args.hf_checkpoint)
    return export_hf(chunks, ckpt.arch, out_dir or args.save_hf, source_config=ckpt.config,
                     source_dir=ckpt.model_dir, tokenizer_dir=args.tokenizer or ckpt.model_dir)


def export_checkpoint(args: argparse.Namespace) -> int:
    """``megatron-rl-agg export-hf``: a trainer checkpoint (``dist_checkpointing``, any layout) -> a Hugging
    Face directory. Runs in one process (or under torchrun at the given TP / PP); returns 0."""
    from megatron_rl_agg.mcore import compat
    from megatron_rl_agg.hf.export import export_hf
    from megatron_rl_agg.hf.load import gpt_spec_from_hf
    from megatron_rl_agg.mcore.build import build_model

    ckpt = hf_checkpoint(args.hf_checkpoint)     # checks config and tensors before any process group
    step = checkpoint.latest_step(args.load) if args.step is None else args.step
    compat.initialize_distributed()
    compat.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    try:
        spec = gpt_spec_from_hf(ckpt.arch, tp=args.tensor_model_parallel_size)
        chunks = build_model(spec, wrap_ddp=False)
        checkpoint.load_model_weights(args.load, chunks, step)
        out = export_hf(chunks, ckpt.arch, args.out, source_config=ckpt.config, source_dir=ckpt.model_dir,
                        tokenizer_dir=args.tokenizer or ckpt.model_dir, dtype=args.dtype)
        if out is not None:
            print(f"[megatron_rl_agg] exported step {step} of {args.load} to {out}")
    finally:
        compat.destroy_model_parallel()
    return 0
