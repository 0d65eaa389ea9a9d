"""Hugging Face ``config.json`` -> the fields of :class:`megatron_rl_agg.mcore.spec.GPTSpec` (pure: no torch).

Supported families (``model_type``): ``llama`` (Llama 3.x, Llama 2), ``qwen2`` (Qwen2 / Qwen2.5),
``qwen3`` (Qwen3 dense) and ``mistral``. All are pre-norm decoders with RMSNorm, a SwiGLU MLP
(``down(silu(gate(x)) * up(x))``), grouped-query attention and rotary position embeddings in the
"rotate half" layout, which Megatron-Core's ``GPTModel`` expresses with::

    normalization="RMSNorm", gated_linear_unit=True, activation_func=silu, add_bias_linear=False,
    num_query_groups=num_key_value_heads, kv_channels=head_dim, layernorm_epsilon=rms_norm_eps,
    add_qkv_bias (Qwen2), qk_layernorm (Qwen3), rotary_base=rope_theta,
    share_embeddings_and_output_weights=tie_word_embeddings

Rope settings are read from both layouts transformers writes: v4 (top-level ``rope_theta`` and
``rope_scaling``) and v5 (``rope_parameters: {rope_theta, rope_type, ...}``). Rope variants:

* ``default`` (no scaling);
* ``llama3``: Megatron's ``rope_scaling=True`` + ``rope_scaling_factor``. Megatron hard-codes
  ``low_freq_factor=1``, ``high_freq_factor=4``, ``original_max_position_embeddings=8192`` (Llama 3.1 /
  3.2 / 3.3 values); a checkpoint with other values is refused, never approximated.

Everything else (``linear``, ``dynamic``, ``yarn``, ``longrope``, sliding-window attention, attention or
MLP biases other than Qwen2's qkv bias) is refused with an error naming the value and the supported ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

__all__ = ["SUPPORTED_MODEL_TYPES", "SUPPORTED_ROPE_TYPES", "HFConfigError", "HFArch", "read_hf_config",
           "arch_from_config", "config_dtype", "padded_vocab_size"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
# What Megatron-Core's RotaryEmbedding._apply_scaling hard-codes (megatron/core/models/common/embeddings/
# rotary_pos_embedding.py): the Llama-3 scaling it implements is fixed but for the factor.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}


class HFConfigError(ValueError):
    """A Hugging Face config this package cannot express (the message names the file, key and value)."""


@dataclass(frozen=True)
class HFArch:
    """The architecture of a Hugging Face decoder, in the terms Megatron-Core's GPTModel takes."""

    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    """Per-head width ``head_dim`` (Qwen3: not ``hidden_size / num_attention_heads``)."""
    vocab_size: int
    """The checkpoint's vocabulary (rows of ``embed_tokens``), before any TP padding."""
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling_factor: Optional[float]
    """Llama-3 rope scaling factor, or None without scaling."""
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    torch_dtype: str = "float32"

    @property
    def q_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


def read_hf_config(model_dir: str) -> dict:
    """The parsed ``config.json`` of ``model_dir`` (raises naming the directory when it is missing)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"Hugging Face model directory {model_dir!r} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model_dir!r} is not a Hugging Face model directory: it has no config.json")
    with open(path, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as err:
            raise HFConfigError(f"{path}: not valid JSON ({err})") from None


def _rope(cfg: dict, where: str) -> tuple[float, Optional[float]]:
    """``(rope_theta, llama3 factor or None)`` from the v4 or v5 layout."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:        # transformers 5.x
        theta = params.get("rope_theta", cfg.get("rope_theta"))
        scaling = params
    else:                                          # transformers 4.x
        theta = cfg.get("rope_theta")
        scaling = cfg.get("rope_scaling") or {}
    if theta is None:
        theta = 10000.0
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise HFConfigError(f"{where}: rope type {rope_type!r} is not supported; supported: "
                            f"{list(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), None
    for key, value in MEGATRON_LLAMA3_ROPE.items():
        got = scaling.get(key)
        if got is None or float(got) != float(value):
            raise HFConfigError(
                f"{where}: llama3 rope scaling with {key}={got!r}; Megatron-Core implements only "
                f"{MEGATRON_LLAMA3_ROPE} (any factor), so this checkpoint cannot be expressed")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise HFConfigError(f"{where}: llama3 rope scaling needs a positive 'factor', got {factor!r}")
    return float(theta), float(factor)


def _require(cfg: dict, key: str, where: str):
    if key not in cfg or cfg[key] is None:
        raise HFConfigError(f"{where}: missing {key!r}")
    return cfg[key]


def arch_from_config(cfg: dict, where: str = "config.json") -> HFArch:
    """Validate a parsed ``config.json`` and return its :class:`HFArch`.

    Raises:
        HFConfigError: unsupported ``model_type``, rope variant, activation, bias or attention setting.
    """
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFConfigError(f"{where}: model_type {model_type!r} is not supported; supported: "
                            f"{list(SUPPORTED_MODEL_TYPES)}")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise HFConfigError(f"{where}: hidden_act {act!r} is not supported; supported: ['silu']")
    if cfg.get("mlp_bias"):
        raise HFConfigError(f"{where}: mlp_bias=True is not supported (Megatron's add_bias_linear would add "
                            "biases to every linear layer)")
    qkv_bias = bool(cfg.get("attention_bias", False)) or model_type == "qwen2"
    if model_type == "llama" and cfg.get("attention_bias"):
        # Llama's attention_bias also puts a bias on o_proj, which Megatron cannot express alone.
        raise HFConfigError(f"{where}: attention_bias=True (llama) is not supported; supported: False")
    if model_type == "qwen3" and cfg.get("attention_bias"):
        raise HFConfigError(f"{where}: attention_bias=True (qwen3) is not supported; supported: False")
    window = cfg.get("sliding_window")
    if window is not None and (cfg.get("use_sliding_window", model_type == "mistral")):
        raise HFConfigError(f"{where}: sliding-window attention (sliding_window={window}) is not supported; "
                            "set sliding_window to null for full attention")
    heads = int(_require(cfg, "num_attention_heads", where))
    hidden = int(_require(cfg, "hidden_size", where))
    groups = int(cfg.get("num_key_value_heads") or heads)
    if heads % groups:
        raise HFConfigError(f"{where}: num_attention_heads={heads} is not a multiple of "
                            f"num_key_value_heads={groups}")
    head_dim = cfg.get("head_dim")
    head_dim = int(head_dim) if head_dim else hidden // heads
    theta, factor = _rope(cfg, where)
    dtype = config_dtype(cfg)
    return HFArch(
        model_type=model_type, num_layers=int(_require(cfg, "num_hidden_layers", where)), hidden_size=hidden,
        ffn_hidden_size=int(_require(cfg, "intermediate_size", where)), num_attention_heads=heads,
        num_query_groups=groups, kv_channels=head_dim, vocab_size=int(_require(cfg, "vocab_size", where)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling_factor=factor,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
        qk_norm=model_type == "qwen3", torch_dtype=str(dtype))


def config_dtype(cfg: dict) -> str:
    """The weights' dtype name of a ``config.json``: transformers 5 writes ``dtype``, 4.x ``torch_dtype``;
    with both present ``dtype`` wins, as transformers 5 reads it. ``"float32"`` when neither is set."""
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 1) -> int:
    """The smallest multiple of ``multiple * tp`` that is ``>= vocab_size`` (Megatron's vocab padding)."""
    step = multiple * tp
    return -(-vocab_size // step) * step
