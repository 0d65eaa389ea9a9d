"""End-to-end GRPO-family trainer on Megatron-Core (see docs/training.md), by stage.

* ``cli/``: ``validation`` (:class:`TrainerArgsError` and the up-front checks: YAML values, number flags,
  model shapes, rollout rows), ``hf_args`` (the Hugging Face flags and their checks, the ``export-hf``
  flags), ``arguments`` (the parser, YAML configs, ``validate_args``; builds on the two);
* ``rollout/``: ``task`` (the synthetic counting task and its reward), ``rollouts`` (offline JSONL
  reader), ``hf_text`` (the text task of ``--prompt-data``, the tokenizer of text rollouts), ``sources``
  (offline and on-policy rows per step), ``generation`` (sampling with the Megatron model at any layout);
* ``step/``: ``batching`` (row tensors, padding), ``reference`` (the frozen KL reference), ``nonfinite`` (the non-finite guard of an update), ``update``
  (one mini-batch through Megatron's schedule and the optimizer, its loss metrics);
* ``loop/``: ``checkpoint`` (dist_checkpointing save/resume), ``hf_model`` (a Hugging Face checkpoint as
  the model: spec, weights, ``--save-hf``, ``export-hf``), ``build`` (the run: groups, model, optimizer,
  reference, source, resume), ``safety`` (signals, timeouts), ``reporting`` (metrics file, TensorBoard,
  progress bar) and ``train`` (the step and the loop: ``train.run(args)``).

Imports go one way, ``cli`` < ``rollout`` < ``step`` < ``loop`` (a stage imports only the stages before it;
``tests/test_architecture.py`` checks it). The forward-only passes the stages share (sampling, old and
reference log-probs) are Megatron glue: :mod:`megatron_rl_agg.mcore.forward`. Importing this package
imports none of them.
"""
