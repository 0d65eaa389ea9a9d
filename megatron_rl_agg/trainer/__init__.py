"""End-to-end GRPO-family trainer on Megatron-Core (see docs/training.md).

Modules: ``arguments`` (flags and YAML configs), ``task`` (the synthetic counting task and its reward),
``rollouts`` (offline JSONL reader), ``sources`` (offline and on-policy rows per step), ``generation``
(sampling with the Megatron model at any layout), ``forward`` (forward-only passes), ``reference`` (the
frozen KL reference), ``batching`` (row tensors, DP shards, padding), ``checkpoint`` (dist_checkpointing
save/resume), ``reporting`` (metrics file, TensorBoard, progress bar) and ``train`` (the loop:
``train.run(args)``). Importing this package imports none of them.
"""
