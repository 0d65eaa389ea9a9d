"""Hugging Face glue: checkpoints in and out at any TP / PP / VPP layout, tokenizers, text prompts, rewards.

Needs the ``hf`` extra (``pip install megatron_rl_agg[hf]``: transformers, safetensors, tokenizers,
math-verify, pyarrow); the core package imports without it. Modules:

* :mod:`.config`: ``config.json`` (v4 and v5 rope layouts) -> architecture, with refusals;
* :mod:`.mapping`: per-tensor name / layout mapping (query-group QKV, ``fc1 = [gate; up]``);
* :mod:`.load`: lazy per-rank safetensors reads into GPTModel chunks;
* :mod:`.export`: chunks -> safetensors + config + tokenizer files, atomically;
* :mod:`.prompts` / :mod:`.rewards`: text prompt files, tokenizers, and the rewards of text responses.

Nothing here imports the trainer; the trainer's flags, model loading, text task and export command built
on these modules live in :mod:`megatron_rl_agg.trainer` (``cli/hf_args``, ``loop/hf_model``,
``rollout/hf_text``). See ``docs/models.md``.
"""
