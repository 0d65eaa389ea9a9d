"""Tiny Hugging Face models with a trained tokenizer that vLLM's CPU build serves (head_dim 32: its CPU
attention refuses smaller heads), made offline in milliseconds."""

from __future__ import annotations

import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent / "hf"))

from hf_models import hf_config, prompt_texts, train_tokenizer  # noqa: E402

PROMPTS = REPO / "examples" / "gsm8k_mini.jsonl"
VOCAB = 384


def save_engine_model(path: str, family: str = "qwen2", seed: int = 0, *, hidden: int = 128, layers: int = 2,
                      ffn: int = 192) -> str:
    """A ``family`` model (default: 2 layers, hidden 128, FFN 192; heads of 32, ``hidden / 32`` of them,
    half as many KV heads; untied embeddings) with random norms and biases, and a byte-level BPE
    tokenizer of the shipped prompt file (chat template, EOS ``<|endoftext|>``)."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(family, vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn,
                    num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64, num_hidden_layers=layers, max_position_embeddings=256)
    cfg.head_dim = 32                   # the test family configs fix 16 for Qwen3; vLLM's CPU needs >= 32
    cfg.tie_word_embeddings = False     # vLLM's in-place reload misses a tied LM head (docs/engine.md)
    if family == "llama":
        cfg.rope_scaling = None
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if name.endswith("bias") else 1.0))
            else:
                p.copy_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    train_tokenizer(path, prompt_texts(str(PROMPTS)), vocab_size=VOCAB)
    return path
