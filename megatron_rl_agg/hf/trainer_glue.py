"""The trainer's Hugging Face options: ``--hf-checkpoint``, ``--tokenizer``, ``--prompt-data``, ``--reward``,
``--save-hf`` (imported by :mod:`megatron_rl_agg.trainer`; transformers & co. only load when used).

* ``--hf-checkpoint DIR`` sets the architecture (the size flags are taken from ``config.json``) and the
  initial weights (policy and, with ``--kl-coef > 0``, reference); ``--train-iters 0 --save-hf OUT``
  converts without training.
* ``--prompt-data FILE`` makes on-policy rollouts from a text prompt file (:mod:`.prompts`), tokenized by
  ``--tokenizer`` (default: the checkpoint directory), scored by ``--reward`` (:mod:`.rewards`);
  generation stops at the tokenizer's / ``generation_config.json``'s EOS ids.
* ``--save-hf OUT`` exports the policy as a Hugging Face directory (:mod:`.export`) after the last step,
  and every ``--save-interval`` steps when both are given.
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Optional

__all__ = ["add_hf_args", "validate_hf_args", "hf_checkpoint", "hf_model_spec", "load_hf_policy",
           "text_task", "text_tokenizer", "save_hf", "add_export_args", "export_checkpoint"]


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
    g.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap each prompt in the tokenizer's chat template (default: when it has one)")
    g.add_argument("--save-hf", default=None,
                   help="export the policy as a Hugging Face directory after the last step (and every "
                        "--save-interval steps); needs --hf-checkpoint")


def validate_hf_args(args: argparse.Namespace, error) -> None:
    """Checks before any process group: fills the size flags from ``config.json``, resolves the reward."""
    if args.save_hf and not args.hf_checkpoint:
        raise error("--save-hf needs --hf-checkpoint (the architecture and tokenizer to export)")
    if args.prompt_data and args.rollouts:
        raise error("--prompt-data and --rollouts are exclusive (on-policy text prompts or an offline file)")
    if args.prompt_data and not (args.tokenizer or args.hf_checkpoint):
        raise error("--prompt-data needs --tokenizer (or --hf-checkpoint holding one)")
    if args.prompt_data:
        from megatron_rl_agg.hf.rewards import RewardError, get_reward

        try:
            get_reward(args.reward)
        except RewardError as err:
            raise error(str(err)) from None
    if not args.hf_checkpoint:
        return
    from megatron_rl_agg.hf.config import HFConfigError, arch_from_config, read_hf_config

    try:
        arch = arch_from_config(read_hf_config(args.hf_checkpoint),
                                os.path.join(args.hf_checkpoint, "config.json"))
    except (FileNotFoundError, HFConfigError) as err:
        raise error(f"--hf-checkpoint: {err}") from None
    args.num_layers, args.hidden_size, args.ffn_hidden_size = arch.num_layers, arch.hidden_size, \
        arch.ffn_hidden_size
    args.num_attention_heads, args.vocab_size = arch.num_attention_heads, arch.vocab_size
    if arch.vocab_size % args.tensor_model_parallel_size:
        # Padding rows would enter the softmax of every log-prob with logit 0 (Megatron-LM does that);
        # the trainer refuses rather than train on log-probs that differ from the model's.
        raise error(f"--hf-checkpoint vocabulary {arch.vocab_size} is not a multiple of "
                    f"--tensor-model-parallel-size {args.tensor_model_parallel_size}; the trainer does not pad "
                    "the vocabulary (padded logits would change every log-prob)")
    if arch.num_query_groups % args.tensor_model_parallel_size:
        raise error(f"--tensor-model-parallel-size {args.tensor_model_parallel_size} must divide the "
                    f"checkpoint's num_key_value_heads {arch.num_query_groups}")


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


def text_task(args):
    """The :class:`~megatron_rl_agg.hf.prompts.TextTask` of ``--prompt-data``."""
    from megatron_rl_agg.hf.prompts import TextTask, eos_token_ids, load_tokenizer
    from megatron_rl_agg.hf.rewards import RewardScorer, get_reward

    tok_dir = args.tokenizer or args.hf_checkpoint
    tokenizer = load_tokenizer(tok_dir)
    return TextTask.from_file(
        args.prompt_data, tokenizer, RewardScorer(get_reward(args.reward)), prompt_key=args.prompt_key,
        answer_key=args.answer_key, apply_chat_template=args.apply_chat_template, seed=args.seed,
        max_prompt_tokens=args.seq_length + 1 - args.max_new_tokens,
        eos_ids=eos_token_ids(tokenizer, args.hf_checkpoint), vocab_size=args.vocab_size)


def text_tokenizer(args):
    """``text -> token ids`` of ``--tokenizer`` (default the checkpoint), loaded on first use, no special
    tokens added: offline rollout text is tokenized as written."""
    from megatron_rl_agg.hf.prompts import load_tokenizer

    state = {}

    def tokenize(text: str) -> list[int]:
        if "tok" not in state:
            state["tok"] = load_tokenizer(args.tokenizer or args.hf_checkpoint)
        return state["tok"](text, add_special_tokens=False)["input_ids"]

    return tokenize


def save_hf(chunks: list, args, out_dir: Optional[str] = None) -> Optional[str]:
    """Export ``chunks`` to ``--save-hf`` (every rank calls; rank 0 writes)."""
    from megatron_rl_agg.hf.export import export_hf

    ckpt = hf_checkpoint(args.hf_checkpoint)
    return export_hf(chunks, ckpt.arch, out_dir or args.save_hf, source_config=ckpt.config,
                     source_dir=ckpt.model_dir, tokenizer_dir=args.tokenizer or ckpt.model_dir)


def add_export_args(parser: argparse.ArgumentParser) -> None:
    """Flags of ``megatron-rl-agg export-hf``."""
    parser.add_argument("--hf-checkpoint", required=True,
                        help="the Hugging Face directory the run started from (architecture, config, tokenizer)")
    parser.add_argument("--load", required=True, help="trainer checkpoint directory (its --save)")
    parser.add_argument("--out", required=True, help="Hugging Face directory to write (atomically)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer files to copy (default: --hf-checkpoint)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="dtype of the exported weights (default: the config's torch_dtype)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="TP size to load at (under torchrun; any layout loads any checkpoint)")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size to load at")


def export_checkpoint(args: argparse.Namespace) -> int:
    """``megatron-rl-agg export-hf``: a trainer checkpoint (``dist_checkpointing``, any layout) -> a Hugging
    Face directory. Runs in one process (or under torchrun at the given TP / PP); returns 0."""
    from megatron_rl_agg.mcore import compat
    from megatron_rl_agg.hf.export import export_hf
    from megatron_rl_agg.hf.load import gpt_spec_from_hf
    from megatron_rl_agg.mcore.model import build_model
    from megatron_rl_agg.trainer.loop import checkpoint

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
