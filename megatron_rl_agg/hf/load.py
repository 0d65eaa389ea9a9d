"""Import a Hugging Face checkpoint into Megatron-Core ``GPTModel`` chunks at any TP / PP / VPP layout.

Each rank reads only the slices of the safetensors files its own parameters hold: for every parameter
shard (a ``ShardedTensor`` of ``sharded_state_dict()``, whose ``global_slice()`` says which part of the
full tensor of its global key it is, see :mod:`megatron_rl_agg.mcore.weights`), the mapping of
:mod:`megatron_rl_agg.hf.mapping` gives the Hugging Face row blocks, and ``safe_open(...).get_slice(name)
[rows, cols]`` reads just those rows and columns from the memory-mapped file. A TP rank of a 70B model so
reads ``1 / (TP * PP)`` of the weights and never materializes the whole model.

Typical use (every rank)::

    ckpt = HFCheckpoint("path/to/Qwen2.5-0.5B")         # config.json + *.safetensors (+ index)
    spec = gpt_spec_from_hf(ckpt.arch, tp=2, max_seq_length=1024)
    chunks = build_model(spec)
    load_hf_weights(chunks, ckpt)
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from megatron_rl_agg.hf import mapping
from megatron_rl_agg.hf.config import HFArch, HFConfigError, arch_from_config, padded_vocab_size, read_hf_config

__all__ = ["HFCheckpointError", "HFCheckpoint", "gpt_spec_from_hf", "load_hf_weights"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some older checkpoints carry; they are recomputed from the config, never read.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFCheckpointError(ValueError):
    """A Hugging Face directory whose weights disagree with its config (the message names file and tensor)."""


class HFCheckpoint:
    """A Hugging Face model directory opened lazily: config parsed and checked, tensor names and shapes
    read from the safetensors headers, no tensor data read until :meth:`read_rows`.

    Raises (on construction, before any tensor is read):
        FileNotFoundError: no directory, no ``config.json``, or neither ``model.safetensors`` nor its index.
        HFConfigError: an architecture or rope variant Megatron cannot express.
        HFCheckpointError: a tensor missing, an unexpected extra tensor, or a shape that disagrees with
            ``config.json``.
    """

    def __init__(self, model_dir: str):
        from safetensors import safe_open

        self.model_dir = model_dir
        self.config = read_hf_config(model_dir)
        self.arch: HFArch = arch_from_config(self.config, os.path.join(model_dir, "config.json"))
        index = os.path.join(model_dir, INDEX_FILE)
        single = os.path.join(model_dir, SINGLE_FILE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh).get("weight_map", {})
            self.files = {name: os.path.join(model_dir, f) for name, f in weight_map.items()}
        elif os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise FileNotFoundError(f"{model_dir!r} holds no weights: neither {SINGLE_FILE} nor {INDEX_FILE} "
                                    "(only safetensors checkpoints are read)")
        self._handles: dict[str, object] = {}
        self._check_tensors()

    def _handle(self, path: str):
        from safetensors import safe_open

        if path not in self._handles:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: listed in {INDEX_FILE} but missing")
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def _check_tensors(self) -> None:
        expected = mapping.hf_names(self.arch)
        present = {n for n in self.files if not n.endswith(_IGNORED_SUFFIXES)}
        if self.arch.tie_word_embeddings:
            present.discard("lm_head.weight")      # some tied checkpoints store the shared copy too
        missing = [n for n in expected if n not in present]
        extra = sorted(present - set(expected))
        if missing:
            raise HFCheckpointError(f"{self.model_dir}: tensor(s) missing for a {self.arch.model_type} model of "
                                    f"this config.json: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if extra:
            raise HFCheckpointError(f"{self.model_dir}: unexpected tensor(s) for a {self.arch.model_type} model "
                                    f"of this config.json: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
        for name in expected:
            shape = tuple(self._handle(self.files[name]).get_slice(name).get_shape())
            want = mapping.hf_shape(self.arch, name)
            if shape != want:
                raise HFCheckpointError(f"{self.files[name]}: tensor {name!r} has shape {list(shape)} but "
                                        f"config.json implies {list(want)}")

    def read(self, name: str, rows: slice, cols: tuple) -> torch.Tensor:
        """Rows ``rows`` (and trailing-dim slices ``cols``) of tensor ``name``, read lazily."""
        return self._handle(self.files[name]).get_slice(name)[(rows, *cols)]

    def read_megatron(self, key: str, layer: Optional[int], index: tuple, padded_vocab: int,
                      dtype: torch.dtype, qkv_layout: str = "grouped") -> torch.Tensor:
        """The part ``index`` (slices over the full per-layer shape) of Megatron tensor ``key``."""
        shape = mapping.megatron_shape(self.arch, key, padded_vocab)
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        lo, hi, step = index[0].indices(shape[0])
        if step != 1:
            raise ValueError(f"strided slice {index[0]} of {key!r}")
        cols = index[1:]
        col_shape = [len(range(*s.indices(n))) for s, n in zip(cols, shape[1:])]
        pieces, offset = [], 0
        for block in mapping.megatron_blocks(self.arch, key, layer, padded_vocab, qkv_layout):
            a, b = max(lo, offset), min(hi, offset + block.rows)
            if a < b:
                if block.name is None:
                    pieces.append(torch.zeros([b - a, *col_shape], dtype=dtype))
                else:
                    start = block.start + a - offset
                    pieces.append(self.read(block.name, slice(start, start + b - a), cols).to(dtype))
            offset += block.rows
        return torch.cat(pieces, 0)


def gpt_spec_from_hf(arch: HFArch, *, tp: int = 1, max_seq_length: Optional[int] = None,
                     vocab_multiple: int = 1, bf16: bool = False, **overrides):
    """The :class:`~megatron_rl_agg.mcore.spec.GPTSpec` of ``arch``, its vocabulary padded to a multiple of
    ``vocab_multiple * tp`` (padding rows are zero and stripped again on export)."""
    from megatron_rl_agg.mcore.spec import GPTSpec

    fields = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_attention_heads,
        vocab_size=padded_vocab_size(arch.vocab_size, tp, vocab_multiple),
        max_seq_length=max_seq_length or arch.max_position_embeddings, ffn_hidden_size=arch.ffn_hidden_size,
        num_query_groups=arch.num_query_groups, kv_channels=arch.kv_channels, bf16=bf16,
        tie_embeddings=arch.tie_word_embeddings, position_embedding_type="rope", normalization="RMSNorm",
        swiglu=True, add_bias_linear=False, add_qkv_bias=arch.qkv_bias, qk_layernorm=arch.qk_norm,
        layernorm_epsilon=arch.rms_norm_eps, rotary_base=arch.rope_theta,
        rope_scaling_factor=arch.rope_scaling_factor)
    fields.update(overrides)
    return GPTSpec(**fields)


@torch.no_grad()
def load_hf_weights(chunks: list, ckpt: HFCheckpoint, *, qkv_layout: str = "grouped") -> None:
    """Copy the checkpoint into this rank's parameters, reading only the slices they hold.

    Every parameter shard is written exactly once (``model._param_shards`` checks the coverage). Call
    before building the optimizer (mixed-precision optimizers copy the weights into fp32 main weights).

    Args:
        qkv_layout: ``"grouped"`` (right) or ``"plain"`` (a deliberately wrong ``[q; k; v]``, for tests).
    """
    from megatron_rl_agg.mcore.build import unwrap
    from megatron_rl_agg.mcore.weights import _param_shards

    config = unwrap(chunks[0]).config
    if config.num_query_groups % config.tensor_model_parallel_size:
        raise HFConfigError(f"num_key_value_heads={config.num_query_groups} is not a multiple of the TP size "
                            f"{config.tensor_model_parallel_size} (TP splits whole query groups)")
    padded_vocab = None
    for _, sh in _param_shards(chunks):
        if sh.key in (mapping.EMBED, mapping.OUTPUT):
            padded_vocab = sh.global_shape[0]
    for _, sh in _param_shards(chunks):
        prepend = sh.prepend_axis_num
        layer = sh.global_offset[0] if prepend else None
        value = ckpt.read_megatron(sh.key, layer, sh.global_slice()[prepend:],
                                   padded_vocab or ckpt.arch.vocab_size, sh.data.dtype, qkv_layout)
        sh.data.copy_(value.reshape(sh.data.shape))
