"""Text prompt files (JSONL or Parquet), tokenized with a Hugging Face tokenizer, as an on-policy task.

A prompt file holds one record per prompt with a question and a reference answer under the keys given by
``--prompt-key`` / ``--answer-key`` (default GSM8K's ``question`` / ``answer``)::

    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = 7 apples.\n#### 7"}

``.jsonl`` / ``.json`` files are read as JSON lines, ``.parquet`` with pyarrow. A GSM8K answer is reduced to
the text after its last ``####``; other answers are used as they are. With the chat template (on by default
when the tokenizer has one) the question becomes one user message followed by the generation prompt.

Prompts are shuffled deterministically: epoch ``e`` is the permutation of ``torch.randperm`` seeded from
``(seed, e)``, and step ``k`` (from 1) takes prompts ``(k - 1) * P .. k * P - 1`` of the concatenated
epochs, ``P`` prompts per step. So the prompts of a step depend on the seed and the step only (a resumed
run sees what the uninterrupted one saw), and every prompt is used once per epoch.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_rl_agg.core.seeds import seeded_generator
from megatron_rl_agg.hf.reward_pool import RewardPool, RewardResult

__all__ = ["PromptFileError", "PromptTokens", "extract_answer", "read_prompt_records", "TextTask",
           "load_tokenizer", "eos_token_ids"]


class PromptFileError(ValueError):
    """A prompt file that cannot be used (the message names the file, the record and the problem)."""


class PromptTokens(tuple):
    """A prompt's token ids (a tuple) that also carries its text and reference answer."""

    text: str
    answer: str
    index: int

    def __new__(cls, tokens: Sequence[int], text: str, answer: str, index: int):
        self = super().__new__(cls, tokens)
        self.text, self.answer, self.index = text, answer, index
        return self


def extract_answer(answer: str) -> str:
    """GSM8K's ``"... #### 72"`` -> ``"72"``; any other answer stripped."""
    answer = str(answer)
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip().replace(",", "")
    return answer.strip()


def read_prompt_records(path: str, prompt_key: str, answer_key: str) -> list[tuple[str, str]]:
    """``[(question, answer)]`` of a JSONL or Parquet file (raises naming the file, line and key)."""
    if not os.path.isfile(path):
        raise PromptFileError(f"prompt file {path!r} does not exist")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = [k for k in (prompt_key, answer_key) if k not in table.column_names]
        if missing:
            raise PromptFileError(f"{path}: no column(s) {missing}; columns: {table.column_names} "
                                  "(choose them with --prompt-key / --answer-key)")
        rows = list(zip(table.column(prompt_key).to_pylist(), table.column(answer_key).to_pylist()))
        where = [f"{path}: row {i}" for i in range(len(rows))]
    else:
        rows, where = [], []
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PromptFileError(f"{path}:{number}: not JSON ({err})") from None
                missing = [k for k in (prompt_key, answer_key) if not isinstance(obj, dict) or k not in obj]
                if missing:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise PromptFileError(f"{path}:{number}: no key(s) {missing}; the record has {keys} "
                                          "(choose them with --prompt-key / --answer-key)")
                rows.append((obj[prompt_key], obj[answer_key]))
                where.append(f"{path}:{number}")
    if not rows:
        raise PromptFileError(f"{path}: no prompts")
    out = []
    for (question, answer), loc in zip(rows, where):
        if not isinstance(question, str) or not question.strip():
            raise PromptFileError(f"{loc}: {prompt_key!r} must be a non-empty string, got {question!r:.60}")
        if answer is None:
            raise PromptFileError(f"{loc}: {answer_key!r} is null")
        out.append((question, extract_answer(str(answer))))
    return out


def load_tokenizer(path: str):
    """``AutoTokenizer.from_pretrained(path)`` offline, with a clear error for a directory without one."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                               "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(f"{path!r} holds no tokenizer (no tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def eos_token_ids(tokenizer, model_dir: Optional[str] = None) -> tuple[int, ...]:
    """The tokenizer's EOS id plus ``generation_config.json``'s ``eos_token_id`` (an int or a list)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for d in filter(None, (model_dir,)):
        path = os.path.join(d, "generation_config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                eos = json.load(fh).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if not ids:
        raise ValueError("the tokenizer has no eos_token and generation_config.json no eos_token_id: "
                         "on-policy generation could never stop")
    return tuple(sorted(ids))


@functools.lru_cache(maxsize=4)
def _epoch_order(num: int, seed: int, epoch: int) -> list[int]:
    gen = seeded_generator(seed, "prompts", epoch)        # sha256(f"{seed}/prompts/{epoch}")
    return tuple(torch.randperm(num, generator=gen).tolist())


@dataclass
class TextTask:
    """On-policy task of a prompt file: prompts per step, EOS ids, and the text reward of a response.

    Interface used by :mod:`megatron_rl_agg.trainer.rollout.generation`: :meth:`step_prompts`,
    :meth:`rewards`, ``eos_ids``, ``max_prompt_length``; :meth:`close` stops the reward workers.
    """

    tokenizer: object
    prompts: list[PromptTokens]
    scorer: RewardPool
    eos_ids: tuple[int, ...]
    seed: int

    @classmethod
    def from_file(cls, path: str, tokenizer, scorer: RewardPool, *, prompt_key: str = "question",
                  answer_key: str = "answer", apply_chat_template: Optional[bool] = None, seed: int = 0,
                  max_prompt_tokens: Optional[int] = None, eos_ids: Sequence[int] = (),
                  vocab_size: Optional[int] = None) -> "TextTask":
        """Read and tokenize every prompt up front (errors name the file and record).

        Args:
            apply_chat_template: None = when the tokenizer has a chat template.
            max_prompt_tokens: refuse prompts longer than this (``--seq-length + 1 - --max-new-tokens``).
            vocab_size: the model's vocabulary; a tokenizer that can produce larger ids is refused.
        """
        if vocab_size is not None and len(tokenizer) > vocab_size:
            raise PromptFileError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                                  f"{vocab_size}: token ids past the embedding would be produced")
        use_template = bool(getattr(tokenizer, "chat_template", None)) if apply_chat_template is None \
            else apply_chat_template
        if use_template and not getattr(tokenizer, "chat_template", None):
            raise PromptFileError("--apply-chat-template was requested but the tokenizer has no chat template")
        prompts = []
        for index, (question, answer) in enumerate(read_prompt_records(path, prompt_key, answer_key)):
            if use_template:
                text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                     add_generation_prompt=True)
            else:
                text = question
            ids = tokenizer(text, add_special_tokens=not use_template)["input_ids"]
            if not ids:
                raise PromptFileError(f"{path}: prompt {index} tokenizes to no tokens")
            if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                raise PromptFileError(
                    f"{path}: prompt {index} has {len(ids)} tokens, more than the {max_prompt_tokens} that "
                    f"fit (--seq-length + 1 - --max-new-tokens); raise --seq-length or shorten the prompt")
            prompts.append(PromptTokens(ids, question, answer, index))
        return cls(tokenizer=tokenizer, prompts=prompts, scorer=scorer, eos_ids=tuple(eos_ids), seed=seed)

    @property
    def max_prompt_length(self) -> int:
        return max(len(p) for p in self.prompts)

    def step_prompts(self, num: int, step: int) -> list[PromptTokens]:
        """The ``num`` prompts of step ``step`` (from 1), in the seed's epoch order (module docstring)."""
        total = len(self.prompts)
        out = []
        for position in range((step - 1) * num, step * num):
            epoch, offset = divmod(position, total)
            out.append(self.prompts[_epoch_order(total, self.seed, epoch)[offset]])
        return out

    def rewards(self, prompts: Sequence[PromptTokens], responses: Sequence[Sequence[int]]) -> list[RewardResult]:
        """The rewards of ``responses`` (token ids, EOS included) to ``prompts``, scored on decoded text in
        the reward workers, each within the pool's time limit; a failed sample's result has no value."""
        texts = [self.tokenizer.decode(list(r), skip_special_tokens=True) for r in responses]
        return self.scorer.score([(p.text, t, p.answer) for p, t in zip(prompts, texts)])

    def close(self) -> None:
        self.scorer.close()
