"""torchrun worker (2 processes): import tiny Hugging Face models at TP1 (DP2), TP2, PP2 and PP2 x VPP2,
compare fp32 logits with transformers', and export back from every layout. Launched by test_hf_layouts.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/hf/worker_hf_layouts.py DIR

``DIR/<family>/`` holds the model (written by the test), ``DIR/<family>.pt`` the input tokens and
transformers' logits. Per family and layout this writes ``DIR/export-<family>-<layout>/`` (at TP1 also the
reference route's ``DIR/reference-<family>[-sharded]/``, see tests/hf/export_reference.py) and, on the last
pipeline stage of global rank 0's pipeline, ``DIR/result-<family>-<layout>.pt`` with the max abs logit
difference, plus the deliberately wrong variants (plain ``[q; k; v]``, wrong rope base, no rope scaling).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

from megatron_rl_agg.mcore import compat
from megatron_rl_agg.hf.export import _config_json, _generation_config, export_hf, full_to_hf
from megatron_rl_agg.hf.load import HFCheckpoint, gpt_spec_from_hf, load_hf_weights
from megatron_rl_agg.mcore.build import build_model
from megatron_rl_agg.parallel.layout import parse_layout
from megatron_rl_agg.mcore import forward
from megatron_rl_agg.mcore.weights import gather_full_params

from export_reference import reference_write

SHARDED = 60_000          # bytes per file of the sharded exports (several files + index)

LAYOUTS = ("tp1", "tp2", "pp2", "pp2+vpp2")
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
VOCAB_MULTIPLE = 8       # 90-token vocabularies are padded to 96 rows: padding is exercised at every layout


def _full_logits(logits, micro_batch):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits.float())


def _logit_diff(chunks, tokens, ref):
    out = forward.run_forward_only(chunks, tokens, tokens.shape[0] // forward.microbatch_multiple(),
                                   _full_logits)
    if out is None:
        return None
    return (out[..., : ref.shape[-1]] - ref).abs().max().item()


def run(argv: list[str]) -> None:
    """``argv = [root]`` in a process group that is up (``tests/worker_jobs.py``)."""
    import torch.distributed as torch_dist

    root = argv[0]
    rank = torch_dist.get_rank()
    for family in FAMILIES:
        data = torch.load(os.path.join(root, f"{family}.pt"))
        tokens, ref = data["tokens"], data["logits"]
        ckpt = HFCheckpoint(os.path.join(root, family))
        for text in (LAYOUTS if family != "mistral" else ("tp2",)):
            layout = parse_layout(text)
            compat.initialize_model_parallel(layout.tp, layout.pp, layout.vpp, seed=1)
            spec = gpt_spec_from_hf(ckpt.arch, tp=layout.tp, max_seq_length=tokens.shape[1],
                                    vocab_multiple=VOCAB_MULTIPLE)
            chunks = build_model(spec, wrap_ddp=False)
            load_hf_weights(chunks, ckpt)
            result = {"padded_vocab": spec.vocab_size, "diff": _logit_diff(chunks, tokens, ref)}
            if text == "tp1":          # the reference route: one process writes the full model
                write_reference(chunks, ckpt, root, family)
            export_hf(chunks, ckpt.arch, os.path.join(root, f"export-{family}-{text}"),
                      source_config=ckpt.config, source_dir=ckpt.model_dir,
                      max_shard_bytes=SHARDED if text == "pp2" else 5 * 2**30)    # pp2: sharded + index
            if text == "tp2" and family != "mistral":    # the same comparison must fail for a wrong mapping
                load_hf_weights(chunks, ckpt, qkv_layout="plain")
                result["plain_qkv_diff"] = _logit_diff(chunks, tokens, ref)
                wrong = {"wrong_rope_base_diff": dataclasses.replace(spec, rotary_base=10000.0)}
                if spec.rope_scaling_factor is not None:
                    wrong["no_rope_scaling_diff"] = dataclasses.replace(spec, rope_scaling_factor=None)
                for name, wrong_spec in wrong.items():
                    wrong_chunks = build_model(wrong_spec, wrap_ddp=False)
                    load_hf_weights(wrong_chunks, ckpt)
                    result[name] = _logit_diff(wrong_chunks, tokens, ref)
            if result["diff"] is not None and forward_owner(rank):
                torch.save(result, os.path.join(root, f"result-{family}-{text}.pt"))
            compat.destroy_model_parallel()


def write_reference(chunks, ckpt, root: str, family: str) -> None:
    """``DIR/reference-<family>[-sharded]/``: the export as one process wrote it before the per-stage
    writers (every rank gathers the full fp32 model; rank 0 writes with ``safetensors.save_file``)."""
    import torch.distributed as torch_dist

    full = gather_full_params(chunks)
    if torch_dist.get_rank() != 0:
        return
    from megatron_rl_agg.hf.config import config_dtype

    dtype = config_dtype(ckpt.config)
    tensors = full_to_hf(ckpt.arch, full, getattr(torch, dtype))
    for suffix, limit in (("", 5 * 2**30), ("-sharded", SHARDED)):
        reference_write(os.path.join(root, f"reference-{family}{suffix}"), tensors,
                        _config_json(ckpt.arch, ckpt.config, dtype), tokenizer_dir=ckpt.model_dir,
                        generation_config=_generation_config(ckpt.model_dir, ckpt.model_dir), max_shard_bytes=limit)


def main(root: str) -> None:
    compat.initialize_distributed()
    try:
        run([root])
    finally:
        compat.destroy_distributed()


def forward_owner(rank: int) -> bool:
    """One writer per layout: the first rank of the last pipeline stage's first TP/DP position."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0


if __name__ == "__main__":
    main(sys.argv[1])
