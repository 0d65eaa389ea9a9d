"""The on-policy text task of ``--prompt-data`` and the tokenizer of offline text rollouts (``--tokenizer``).

Both are built from the trainer's flags on top of :mod:`megatron_rl_agg.hf.prompts` and
:mod:`megatron_rl_agg.hf.rewards`; generation stops at the tokenizer's / ``generation_config.json``'s EOS
ids. The flags and their checks: :mod:`megatron_rl_agg.trainer.cli.hf_args`.
"""

from __future__ import annotations

__all__ = ["text_task", "text_tokenizer"]


def text_task(args):
    """The :class:`~megatron_rl_agg.hf.prompts.TextTask` of ``--prompt-data``."""
    from megatron_rl_agg.hf.prompts import TextTask, eos_token_ids, load_tokenizer
    from megatron_rl_agg.hf.reward_pool import RewardPool

    tok_dir = args.tokenizer or args.hf_checkpoint
    tokenizer = load_tokenizer(tok_dir)
    pool = RewardPool(args.reward, timeout=args.reward_timeout, workers=args.reward_workers)
    return TextTask.from_file(
        args.prompt_data, tokenizer, pool, prompt_key=args.prompt_key,
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
