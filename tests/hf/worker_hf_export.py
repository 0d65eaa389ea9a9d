"""torchrun worker (4 processes): export the tiny Hugging Face models from layouts that mix tensor, pipeline,
data and context parallelism (TP2 x PP2, DP2 x TP2, CP2 x PP2). Launched by test_hf_layouts.py.

``DIR/<family>/`` holds the model (written by the test); this writes ``DIR/export4-<family>-<layout>/``,
compared byte for byte with the reference route's export (``DIR/reference-<family>[-sharded]/``, written by
the 2-process job) by the test.
"""

from __future__ import annotations

import os
import sys

from megatron_rl_agg.hf.export import export_hf
from megatron_rl_agg.hf.load import HFCheckpoint, gpt_spec_from_hf, load_hf_weights
from megatron_rl_agg.mcore import compat
from megatron_rl_agg.mcore.build import build_model
from megatron_rl_agg.parallel.layout import parse_layout

LAYOUTS = {"tp2+pp2": 60_000, "dp2+tp2": 5 * 2**30, "cp2+pp2": 5 * 2**30}    # layout: max_shard_bytes
FAMILIES = ("llama", "qwen2", "qwen3")
VOCAB_MULTIPLE = 8


def run(argv: list[str]) -> None:
    """``argv = [root]`` in a process group that is up (``tests/worker_jobs.py``)."""
    root = argv[0]
    for family in FAMILIES:
        ckpt = HFCheckpoint(os.path.join(root, family))
        for text, limit in LAYOUTS.items():
            layout = parse_layout(text)
            compat.initialize_model_parallel(layout.tp, layout.pp, layout.vpp, cp=layout.cp, seed=1)
            spec = gpt_spec_from_hf(ckpt.arch, tp=layout.tp, max_seq_length=16, vocab_multiple=VOCAB_MULTIPLE)
            chunks = build_model(spec, wrap_ddp=False)
            load_hf_weights(chunks, ckpt)
            export_hf(chunks, ckpt.arch, os.path.join(root, f"export4-{family}-{text}"),
                      source_config=ckpt.config, source_dir=ckpt.model_dir, max_shard_bytes=limit)
            compat.destroy_model_parallel()


def main(root: str) -> None:
    compat.initialize_distributed()
    try:
        run([root])
    finally:
        compat.destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
