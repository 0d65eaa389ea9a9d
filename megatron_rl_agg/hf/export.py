"""Export Megatron-Core ``GPTModel`` chunks (any TP / PP / VPP layout) to a Hugging Face directory.

The directory holds what ``transformers`` and vLLM / SGLang load as is::

    config.json                       the source checkpoint's config (or one written from the architecture)
    generation_config.json            copied, or {bos, eos, pad} token ids from the tokenizer
    model.safetensors                 or model-00001-of-0000N.safetensors + model.safetensors.index.json
    tokenizer files                   copied from the tokenizer directory

Full tensors are assembled from every rank's shards (``model.gather_full_params``), split back into
Hugging Face tensors by :func:`megatron_rl_agg.hf.mapping.split_megatron` (query-group QKV -> q, k, v;
``fc1 -> gate, up``; TP vocabulary padding rows dropped) and cast to the config's dtype
(:func:`megatron_rl_agg.hf.config.config_dtype`: ``dtype``, else ``torch_dtype``). The written
``config.json`` carries that one dtype under both keys (``dtype`` and ``torch_dtype``). With
fp32 parameters and an fp32 checkpoint an import followed by an export is bit-exact.

Atomic: rank 0 writes into ``<dir>.tmp-<pid>`` next to the target and renames it into place, so an
interrupted export never leaves a half-written model where a server would load it. An existing target is
replaced only if an earlier export made it (it holds ``EXPORT_MARKER``); any other existing directory is
refused, so an export never destroys data it did not create.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from megatron_rl_agg.hf import mapping
from megatron_rl_agg.hf.config import HFArch, config_dtype

__all__ = ["EXPORT_MARKER", "TOKENIZER_FILES", "HFExportError", "export_hf", "full_to_hf", "write_hf_dir"]

EXPORT_MARKER = "megatron_rl_agg_export.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFExportError(ValueError):
    """An export that cannot be written (the message names the directory)."""


def full_to_hf(arch: HFArch, full: dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None
               ) -> dict[str, torch.Tensor]:
    """``{hf name: tensor}`` from ``{megatron key: full tensor}`` (layer keys stacked ``[L, ...]``)."""
    out: dict[str, torch.Tensor] = {}
    padded_vocab = full[mapping.EMBED].shape[0]
    for key in mapping.megatron_keys(arch):
        if key not in full:
            raise KeyError(f"the model has no tensor {key!r}; it has {sorted(full)}")
        value = full[key]
        if key.startswith("decoder.layers."):
            for layer in range(value.shape[0]):
                out.update(mapping.split_megatron(arch, key, layer, value[layer], padded_vocab))
        else:
            out.update(mapping.split_megatron(arch, key, None, value, padded_vocab))
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    return out


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    return shards


def _config_json(arch: HFArch, source_config: Optional[dict], dtype_name: str) -> dict:
    if source_config is not None:
        cfg = dict(source_config)
    else:
        cfg = {"model_type": arch.model_type, "architectures": [{"llama": "LlamaForCausalLM",
               "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}[arch.model_type]],
               "num_hidden_layers": arch.num_layers, "hidden_size": arch.hidden_size,
               "intermediate_size": arch.ffn_hidden_size, "num_attention_heads": arch.num_attention_heads,
               "num_key_value_heads": arch.num_query_groups, "head_dim": arch.kv_channels,
               "vocab_size": arch.vocab_size, "max_position_embeddings": arch.max_position_embeddings,
               "rms_norm_eps": arch.rms_norm_eps, "rope_theta": arch.rope_theta, "hidden_act": "silu",
               "tie_word_embeddings": arch.tie_word_embeddings}
        if arch.rope_scaling_factor is not None:
            cfg["rope_scaling"] = {"rope_type": "llama3", "factor": arch.rope_scaling_factor,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}
    # One dtype under both spellings: transformers 5 and recent vLLM read ``dtype``, transformers 4.x and
    # older tools ``torch_dtype``; a source's stale key must not contradict the weights written.
    cfg["dtype"] = cfg["torch_dtype"] = dtype_name
    return cfg


def write_hf_dir(out_dir: str, tensors: dict[str, torch.Tensor], config: dict, *,
                 tokenizer_dir: Optional[str] = None, generation_config: Optional[dict] = None,
                 max_shard_bytes: int = 5 * 2**30) -> str:
    """Write a Hugging Face model directory atomically (see the module docstring); returns ``out_dir``."""
    from safetensors.torch import save_file

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isfile(os.path.join(out_dir, EXPORT_MARKER)):
        if not os.path.isdir(out_dir) or os.listdir(out_dir):
            raise HFExportError(f"{out_dir!r} exists and was not written by an export; refusing to replace "
                                "it (choose a new directory or remove it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    if generation_config is not None:
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as fh:
            json.dump(generation_config, fh, indent=2)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(tmp, name))
    with open(os.path.join(tmp, EXPORT_MARKER), "w", encoding="utf-8") as fh:
        json.dump({"tensors": len(tensors), "shards": len(shards)}, fh)
    if os.path.exists(out_dir):           # a previous export: swap, then delete the old one
        old = f"{out_dir}.old-{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)
    return out_dir


def _generation_config(source_dir: Optional[str], tokenizer_dir: Optional[str]) -> Optional[dict]:
    for d in (source_dir, tokenizer_dir):
        if d and os.path.isfile(os.path.join(d, "generation_config.json")):
            with open(os.path.join(d, "generation_config.json"), encoding="utf-8") as fh:
                return json.load(fh)
    if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        return {k: v for k, v in {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                  "pad_token_id": tok.pad_token_id}.items() if v is not None}
    return None


def export_hf(chunks: list, arch: HFArch, out_dir: str, *, source_config: Optional[dict] = None,
              source_dir: Optional[str] = None, tokenizer_dir: Optional[str] = None,
              dtype: Optional[str] = None, max_shard_bytes: int = 5 * 2**30) -> Optional[str]:
    """Export the model ``chunks`` (call on every rank; rank 0 writes) and wait until it is written.

    Args:
        arch: the architecture (the imported checkpoint's ``HFCheckpoint.arch``).
        source_config / source_dir: the imported checkpoint's ``config.json`` (copied with its
            dtype keys set to the export's dtype) and directory (its ``generation_config.json`` is copied).
        tokenizer_dir: tokenizer files to copy (default ``source_dir``).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default the source config's dtype.
        max_shard_bytes: past this total the weights are sharded with an index.

    Returns:
        ``out_dir`` on rank 0, None elsewhere.
    """
    from megatron_rl_agg.mcore.cpu_mode import device
    from megatron_rl_agg.mcore.weights import gather_full_params
    from megatron_rl_agg.parallel import dist

    dtype = dtype or (config_dtype(source_config) if source_config else arch.torch_dtype)
    if dtype not in _DTYPES:
        raise HFExportError(f"export dtype {dtype!r}; valid: {sorted(_DTYPES)}")
    full = gather_full_params(chunks)
    written = None
    if _is_world_rank0():
        tensors = full_to_hf(arch, full, _DTYPES[dtype])
        tokenizer_dir = tokenizer_dir or source_dir
        written = write_hf_dir(out_dir, tensors, _config_json(arch, source_config, dtype),
                               tokenizer_dir=tokenizer_dir,
                               generation_config=_generation_config(source_dir, tokenizer_dir),
                               max_shard_bytes=max_shard_bytes)
    dist.barrier(device())          # the directory exists on every rank's return
    return written


def _groups():
    from megatron.core import parallel_state

    return (parallel_state.get_data_parallel_group(with_context_parallel=True),
            parallel_state.get_model_parallel_group())


def _is_world_rank0() -> bool:
    """Rank 0 of both the DP x CP group and the model-parallel group: exactly one process of the world."""
    from megatron_rl_agg.parallel import dist

    return all(dist.rank(group) == 0 for group in _groups())
