"""Tiny random Hugging Face models for the import / export tests (built from config classes, no download).

Norms and biases are randomized (a norm weight left at 1 or a bias at 0 would hide a mapping mistake).
"""

from __future__ import annotations

import pathlib

import torch

FAMILIES = ("llama", "qwen2", "qwen3")
EXTRA_FAMILIES = ("mistral",)          # falls out of the Llama mapping; checked at TP2 only
VOCAB = 90


def hf_config(family: str, *, rope_factor: float = 8.0, **overrides):
    """The transformers config of one tiny test model (4 layers, so PP2 x VPP2 has a layer per stage);
    ``rope_factor``: the Llama-3 rope scaling factor of the llama family (Llama 3.1: 8, Llama 3.2: 32)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    common.update(overrides)
    if family == "llama":  # Llama-3 rope scaling, untied embeddings
        return LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": rope_factor, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    if family == "qwen2":  # qkv bias, tied embeddings
        return Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1000000.0)
    if family == "qwen3":  # q/k norm, head_dim != hidden / heads
        return Qwen3Config(**common, tie_word_embeddings=False, head_dim=16, rope_theta=1000000.0)
    if family == "mistral":  # full attention (sliding_window null), as Mistral 7B v0.3
        return MistralConfig(**common, tie_word_embeddings=False, sliding_window=None, rope_theta=1000000.0)
    raise ValueError(f"family {family!r}; valid: {FAMILIES + EXTRA_FAMILIES}")


def build_hf_model(family: str, seed: int = 0, **config):
    """A tiny random model of ``family``; ``config`` goes to :func:`hf_config`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **config), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (0.0 if name.endswith("bias") else 1.0))
            else:
                p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def save_hf_model(family: str, path: str, seed: int = 0, **config):
    model = build_hf_model(family, seed, **config)
    model.save_pretrained(path)
    return model


def hf_logits(model_dir_or_model, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = model_dir_or_model
    if isinstance(model, str):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIAL = ["<|endoftext|>", "<|user|>", "<|assistant|>"]


def train_tokenizer(path: str, texts, vocab_size: int = 320, chat_template: bool = True):
    """A byte-level BPE tokenizer trained offline on ``texts`` (milliseconds), saved as a Hugging Face
    tokenizer directory (with a chat template) that ``AutoTokenizer`` reloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def prompt_texts(path: str):
    import json

    with open(path, encoding="utf-8") as fh:
        for line in fh:
            obj = json.loads(line)
            yield obj["question"]
            yield obj["answer"]


def save_trainer_model(path: str, family: str = "qwen2", vocab_size: int = 384, seed: int = 0):
    """A tiny model whose vocabulary matches a trained tokenizer, for trainer runs."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(family, vocab_size=vocab_size, max_position_embeddings=256, num_hidden_layers=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(path)
    return model


def assert_export_equals(out: pathlib.Path, source: pathlib.Path, dtype: torch.dtype) -> None:
    """``out`` has one dtype in config.json, loads in transformers in it, and holds ``source``'s tensors."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = json.loads((out / "config.json").read_text())
    name = str(dtype).removeprefix("torch.")
    assert cfg["dtype"] == cfg["torch_dtype"] == name, cfg
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert model.dtype == dtype
    got, want = load_file(str(out / "model.safetensors")), load_file(str(source / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == dtype and torch.equal(got[key], want[key]), key
    state = model.state_dict()
    for key in want:
        assert torch.equal(state[key], want[key]), key
