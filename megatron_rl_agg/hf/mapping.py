"""Per-tensor mapping between Hugging Face names and Megatron-Core dist-checkpointing keys (pure: no
torch.distributed, no Megatron).

A Megatron tensor of global key ``key`` (transformer layers stacked along a leading layer axis, see
:mod:`megatron_rl_agg.mcore.weights`) at layer ``i`` is the concatenation along dim 0 of row *blocks* of
Hugging Face tensors; :func:`megatron_blocks` lists them, so a rank reads only the rows its TP shard owns and
:func:`split_megatron` inverts the mapping for export. Reference for names and layouts: Megatron-Bridge's
parameter mappings (``megatron/bridge/models/conversion/param_mapping.py``: ``QKVMapping``,
``GatedMLPMapping``, ``AutoMapping``) and its Llama / Qwen bridges.

============================================================  ============================================
Megatron key (layer i)                                        Hugging Face tensor(s)
============================================================  ============================================
``embedding.word_embeddings.weight`` [V_pad, h]               ``model.embed_tokens.weight`` [V, h] + zero rows
``decoder.layers.self_attention.linear_qkv.layer_norm_weight``  ``model.layers.i.input_layernorm.weight``
``decoder.layers.self_attention.linear_qkv.weight``           ``q_proj``, ``k_proj``, ``v_proj`` by query group
``decoder.layers.self_attention.linear_qkv.bias``             their biases, alike (Qwen2)
``decoder.layers.self_attention.q_layernorm.weight``          ``self_attn.q_norm.weight`` (Qwen3)
``decoder.layers.self_attention.k_layernorm.weight``          ``self_attn.k_norm.weight`` (Qwen3)
``decoder.layers.self_attention.linear_proj.weight``          ``self_attn.o_proj.weight``
``decoder.layers.mlp.linear_fc1.layer_norm_weight``           ``post_attention_layernorm.weight``
``decoder.layers.mlp.linear_fc1.weight`` [2F, h]              ``[mlp.gate_proj; mlp.up_proj]``
``decoder.layers.mlp.linear_fc2.weight``                      ``mlp.down_proj.weight``
``decoder.final_layernorm.weight``                            ``model.norm.weight``
``output_layer.weight`` [V_pad, h] (untied only)              ``lm_head.weight`` [V, h] + zero rows
============================================================  ============================================

Fused QKV. With ``G`` query groups, ``Q = heads / G`` query heads per group and head width ``D``, Megatron's
``linear_qkv`` rows are, per group ``g``: its ``Q`` query heads, then its key head, then its value head::

    rows = concat_g [ q[g*Q*D : (g+1)*Q*D], k[g*D : (g+1)*D], v[g*D : (g+1)*D] ]     ([G*(Q+2)*D, h])

so TP rank ``r`` of ``T`` owns whole groups ``[r*G/T, (r+1)*G/T)``. A plain ``[q; k; v]`` concatenation
is wrong for every ``G`` (each head would attend with another head's keys): ``qkv_layout="plain"`` builds
that deliberately wrong mapping for the tests that prove the parity check catches it.

Gated MLP: Megatron computes ``silu(x W1a) * (x W1b)`` with ``W1 = [W1a; W1b]``, so ``fc1 = [gate; up]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_rl_agg.hf.config import HFArch

__all__ = ["Block", "QKV_LAYOUTS", "megatron_keys", "megatron_blocks", "megatron_shape", "hf_names",
           "split_megatron"]

QKV_LAYOUTS = ("grouped", "plain")

EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
_L = "decoder.layers."
QKV_W = _L + "self_attention.linear_qkv.weight"
QKV_B = _L + "self_attention.linear_qkv.bias"
IN_NORM = _L + "self_attention.linear_qkv.layer_norm_weight"
Q_NORM = _L + "self_attention.q_layernorm.weight"
K_NORM = _L + "self_attention.k_layernorm.weight"
PROJ = _L + "self_attention.linear_proj.weight"
POST_NORM = _L + "mlp.linear_fc1.layer_norm_weight"
FC1 = _L + "mlp.linear_fc1.weight"
FC2 = _L + "mlp.linear_fc2.weight"

# Megatron layer key -> Hugging Face suffix under model.layers.{i}. (one-to-one tensors)
_SIMPLE_LAYER = {IN_NORM: "input_layernorm.weight", POST_NORM: "post_attention_layernorm.weight",
                 PROJ: "self_attn.o_proj.weight", FC2: "mlp.down_proj.weight",
                 Q_NORM: "self_attn.q_norm.weight", K_NORM: "self_attn.k_norm.weight"}


@dataclass(frozen=True)
class Block:
    """Rows ``[start, stop)`` of Hugging Face tensor ``name`` (``name=None``: ``stop - start`` zero rows,
    the TP vocabulary padding)."""

    name: Optional[str]
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def megatron_keys(arch: HFArch) -> list[str]:
    """Every Megatron global key the architecture has."""
    keys = [EMBED, FINAL_NORM, IN_NORM, QKV_W, PROJ, POST_NORM, FC1, FC2]
    if arch.qkv_bias:
        keys.append(QKV_B)
    if arch.qk_norm:
        keys += [Q_NORM, K_NORM]
    if not arch.tie_word_embeddings:
        keys.append(OUTPUT)
    return keys


def hf_names(arch: HFArch) -> list[str]:
    """Every Hugging Face tensor name the checkpoint must hold (no more, no fewer)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not arch.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        names += [p + s for s in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                  "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight")]
        if arch.qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if arch.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    return names


def hf_shape(arch: HFArch, name: str) -> tuple[int, ...]:
    """The shape ``config.json`` implies for Hugging Face tensor ``name``."""
    h, d, G, H, F = arch.hidden_size, arch.kv_channels, arch.num_query_groups, arch.num_attention_heads, \
        arch.ffn_hidden_size
    suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    table = {"model.embed_tokens.weight": (arch.vocab_size, h), "lm_head.weight": (arch.vocab_size, h),
             "model.norm.weight": (h,), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
             "self_attn.q_proj.weight": (H * d, h), "self_attn.k_proj.weight": (G * d, h),
             "self_attn.v_proj.weight": (G * d, h), "self_attn.o_proj.weight": (h, H * d),
             "self_attn.q_proj.bias": (H * d,), "self_attn.k_proj.bias": (G * d,), "self_attn.v_proj.bias": (G * d,),
             "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
             "mlp.gate_proj.weight": (F, h), "mlp.up_proj.weight": (F, h), "mlp.down_proj.weight": (h, F)}
    return table[suffix]


def _qkv_blocks(arch: HFArch, prefix: str, kind: str, layout: str) -> list[Block]:
    Q, D, G = arch.q_per_group, arch.kv_channels, arch.num_query_groups
    q, k, v = (f"{prefix}self_attn.{x}_proj.{kind}" for x in "qkv")
    if layout == "plain":
        return [Block(q, 0, G * Q * D), Block(k, 0, G * D), Block(v, 0, G * D)]
    if layout != "grouped":
        raise ValueError(f"qkv_layout {layout!r}; valid: {list(QKV_LAYOUTS)}")
    out = []
    for g in range(G):
        out += [Block(q, g * Q * D, (g + 1) * Q * D), Block(k, g * D, (g + 1) * D), Block(v, g * D, (g + 1) * D)]
    return out


def megatron_blocks(arch: HFArch, key: str, layer: Optional[int], padded_vocab: int,
                    qkv_layout: str = "grouped") -> list[Block]:
    """The row blocks whose dim-0 concatenation is Megatron tensor ``key`` (at layer ``layer``)."""
    if key in (EMBED, OUTPUT):
        name = "model.embed_tokens.weight" if key == EMBED or arch.tie_word_embeddings else "lm_head.weight"
        blocks = [Block(name, 0, arch.vocab_size)]
        if padded_vocab > arch.vocab_size:
            blocks.append(Block(None, 0, padded_vocab - arch.vocab_size))
        return blocks
    if key == FINAL_NORM:
        return [Block("model.norm.weight", 0, arch.hidden_size)]
    if layer is None:
        raise ValueError(f"{key!r} is a per-layer key: a layer index is needed")
    prefix = f"model.layers.{layer}."
    if key == QKV_W:
        return _qkv_blocks(arch, prefix, "weight", qkv_layout)
    if key == QKV_B:
        return _qkv_blocks(arch, prefix, "bias", qkv_layout)
    if key == FC1:
        F = arch.ffn_hidden_size
        return [Block(prefix + "mlp.gate_proj.weight", 0, F), Block(prefix + "mlp.up_proj.weight", 0, F)]
    if key in _SIMPLE_LAYER:
        name = prefix + _SIMPLE_LAYER[key]
        return [Block(name, 0, hf_shape(arch, name)[0])]
    raise KeyError(f"no Hugging Face mapping for Megatron key {key!r}; known: {megatron_keys(arch)}")


def megatron_shape(arch: HFArch, key: str, padded_vocab: int) -> tuple[int, ...]:
    """Shape of Megatron tensor ``key`` for one layer (no layer axis)."""
    blocks = megatron_blocks(arch, key, 0, padded_vocab)
    first = next(b.name for b in blocks if b.name is not None)
    return (sum(b.rows for b in blocks), *hf_shape(arch, first)[1:])


def split_megatron(arch: HFArch, key: str, layer: Optional[int], tensor, padded_vocab: int) -> dict:
    """Invert :func:`megatron_blocks`: ``{hf name: tensor}`` from the full Megatron tensor of one layer.

    Blocks of one name are re-assembled in order (q heads of every group, ...); padding rows are dropped.
    ``tensor`` is any object with row slicing and a ``cat``-able type (a torch tensor).
    """
    import torch

    parts: dict[str, list] = {}
    row = 0
    for block in megatron_blocks(arch, key, layer, padded_vocab):
        if block.name is not None:
            parts.setdefault(block.name, []).append((block.start, tensor[row:row + block.rows]))
        row += block.rows
    if row != tensor.shape[0]:
        raise ValueError(f"{key!r} has {tensor.shape[0]} rows; the mapping expects {row}")
    return {name: torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], 0).contiguous()
            for name, pieces in parts.items()}
