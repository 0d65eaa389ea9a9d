"""The trainer's Hugging Face flags and their up-front checks (transformers & co. only load when used).

* ``--hf-checkpoint DIR`` sets the architecture (the size flags are taken from ``config.json``, here,
  before any other check) and the initial weights (:mod:`megatron_rl_agg.trainer.loop.hf_model`);
  ``--train-iters 0 --save-hf OUT`` converts without training.
* ``--prompt-data FILE`` makes on-policy rollouts from a text prompt file, tokenized by ``--tokenizer``
  (default: the checkpoint directory), scored by ``--reward`` (checked here; the task itself:
  :mod:`megatron_rl_agg.trainer.rollout.hf_text`) in ``--reward-workers`` worker processes, each sample
  within ``--reward-timeout`` seconds; more than ``--max-reward-failure-frac`` of a mini-batch without a
  reward stops the run.
* ``--save-hf OUT`` exports the policy as a Hugging Face directory after the last step, and every
  ``--save-interval`` steps when both are given.

Also the flags of ``megatron-rl-agg export-hf`` (:func:`add_export_args`; the command:
:func:`megatron_rl_agg.trainer.loop.hf_model.export_checkpoint`).
"""

from __future__ import annotations

import argparse
import os

from megatron_rl_agg.trainer.cli.validation import TrainerArgsError, check_positive_flags

__all__ = ["add_hf_args", "validate_hf_args", "add_export_args"]


def add_hf_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Hugging Face model, tokenizer and text prompts (needs the 'hf' extra)")
    g.add_argument("--hf-checkpoint", default=None,
                   help="Hugging Face model directory (Llama 3.x, Qwen2/2.5, Qwen3, Mistral; safetensors) to "
                        "start from: sets the architecture (overrides the model size flags) and the weights")
    g.add_argument("--tokenizer", default=None,
                   help="Hugging Face tokenizer directory for --prompt-data (default: --hf-checkpoint)")
    g.add_argument("--prompt-data", default=None,
                   help="JSONL or Parquet file of text prompts and reference answers for on-policy rollouts")
    g.add_argument("--prompt-key", default="question", help="prompt field of --prompt-data")
    g.add_argument("--answer-key", default="answer",
                   help="reference answer field of --prompt-data (GSM8K '... #### N' keeps N)")
    g.add_argument("--reward", default="math_verify",
                   help="reward of a response to a text prompt: math_verify, exact_match, or module:function "
                        "(called as fn(prompt, response, answer) -> float)")
    g.add_argument("--reward-timeout", type=float, default=10.0,
                   help="seconds one sample's --reward may run (in a worker process, killed past it); a sample "
                        "that times out, raises or returns a non-finite value is invalid (no advantage, no loss)")
    g.add_argument("--reward-workers", type=int, default=1,
                   help="worker processes per rank that run --reward (bounded; a killed one is replaced)")
    g.add_argument("--max-reward-failure-frac", type=float, default=0.5,
                   help="stop the run when more than this fraction of a mini-batch's samples has no reward "
                        "(timed out, raised or non-finite), naming the reward and the first failing prompt")
    g.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap each prompt in the tokenizer's chat template (default: when it has one)")
    g.add_argument("--save-hf", default=None,
                   help="export the policy as a Hugging Face directory after the last step (and every "
                        "--save-interval steps); needs --hf-checkpoint")


def validate_hf_args(args: argparse.Namespace) -> None:
    """Checks before any process group: fills the size flags from ``config.json``, resolves the reward.

    Raises:
        TrainerArgsError: naming the flag.
    """
    if args.save_hf and not args.hf_checkpoint:
        raise TrainerArgsError("--save-hf needs --hf-checkpoint (the architecture and tokenizer to export)")
    if args.prompt_data and args.rollouts:
        raise TrainerArgsError("--prompt-data and --rollouts are exclusive (on-policy text prompts or an "
                               "offline file)")
    if args.prompt_data and not (args.tokenizer or args.hf_checkpoint):
        raise TrainerArgsError("--prompt-data needs --tokenizer (or --hf-checkpoint holding one)")
    check_positive_flags(args, "reward_workers")
    if args.prompt_data:
        from megatron_rl_agg.hf.rewards import RewardError, get_reward

        try:
            get_reward(args.reward)
        except RewardError as err:
            raise TrainerArgsError(str(err)) from None
    if not args.hf_checkpoint:
        return
    from megatron_rl_agg.hf.config import HFConfigError, arch_from_config, read_hf_config

    try:
        arch = arch_from_config(read_hf_config(args.hf_checkpoint),
                                os.path.join(args.hf_checkpoint, "config.json"))
    except (FileNotFoundError, HFConfigError) as err:
        raise TrainerArgsError(f"--hf-checkpoint: {err}") from None
    args.num_layers, args.hidden_size, args.ffn_hidden_size = arch.num_layers, arch.hidden_size, \
        arch.ffn_hidden_size
    args.num_attention_heads, args.vocab_size = arch.num_attention_heads, arch.vocab_size
    if getattr(args, "rollout_engine", "megatron") == "vllm" and arch.tie_word_embeddings:
        raise TrainerArgsError(
            f"--rollout-engine vllm: {args.hf_checkpoint} ties its input and output embeddings "
            "(tie_word_embeddings); vLLM's in-place weight reload (0.32) does not update a tied LM head, so "
            "the engine would keep sampling with the old output layer after every sync. Use a checkpoint "
            "with untied embeddings (e.g. Qwen2.5-7B, Llama 3.1 8B) or --rollout-engine megatron")
    if arch.vocab_size % args.tensor_model_parallel_size:
        # Padding rows would enter the softmax of every log-prob with logit 0 (Megatron-LM does that);
        # the trainer refuses rather than train on log-probs that differ from the model's.
        raise TrainerArgsError(f"--hf-checkpoint vocabulary {arch.vocab_size} is not a multiple of "
                               f"--tensor-model-parallel-size {args.tensor_model_parallel_size}; the trainer does "
                               "not pad the vocabulary (padded logits would change every log-prob)")
    if arch.num_query_groups % args.tensor_model_parallel_size:
        raise TrainerArgsError(f"--tensor-model-parallel-size {args.tensor_model_parallel_size} must divide "
                               f"the checkpoint's num_key_value_heads {arch.num_query_groups}")


def add_export_args(parser: argparse.ArgumentParser) -> None:
    """Flags of ``megatron-rl-agg export-hf``."""
    parser.add_argument("--hf-checkpoint", required=True,
                        help="the Hugging Face directory the run started from (architecture, config, tokenizer)")
    parser.add_argument("--load", required=True, help="trainer checkpoint directory (its --save)")
    parser.add_argument("--out", required=True, help="Hugging Face directory to write (atomically)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer files to copy (default: --hf-checkpoint)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="dtype of the exported weights (default: the config's dtype / torch_dtype)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="TP size to load at (under torchrun; any layout loads any checkpoint)")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size to load at")
