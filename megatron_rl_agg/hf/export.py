"""Export Megatron-Core ``GPTModel`` chunks (any TP / PP / VPP layout) to a Hugging Face directory.

The directory holds what ``transformers`` and vLLM / SGLang load as is::

    config.json                       the source checkpoint's config (or one written from the architecture)
    generation_config.json            copied, or {bos, eos, pad} token ids from the tokenizer
    model.safetensors                 or model-00001-of-0000N.safetensors + model.safetensors.index.json
    tokenizer files                   copied from the tokenizer directory

Who writes what. The file layout is planned from the architecture alone
(:func:`megatron_rl_agg.hf.shards.plan_shards`: names sorted, files cut at ``max_shard_bytes``, every
tensor's byte offset fixed), so the writing is spread over the ranks with no rank holding the model:

* only DP x CP replica 0 writes (other data- and context-parallel replicas hold copies and do nothing);
* in it, every pipeline stage streams its own tensors (:func:`megatron_rl_agg.mcore.weights.stage_full_params`:
  one tensor at a time, gathered over its TP group, the main replica of each: no TP-duplicated norm
  twice, no tied output-layer copy), splits each into Hugging Face tensors
  (:func:`megatron_rl_agg.hf.mapping.split_megatron`: query-group QKV -> q, k, v; ``fc1 -> gate, up``; TP
  vocabulary padding rows dropped), casts them to the export dtype and writes their bytes at their
  planned offsets (TP rank 0 of the stage writes; the stages write in parallel);
* world rank 0 writes the files' headers first, and the index, config, generation config and tokenizer
  files last.

So a writing rank holds its own stage plus one gathered tensor; rank 0 its stage plus the headers.
The directory must be on a filesystem all writing ranks see (one node's ``/dev/shm``, or a shared
filesystem across nodes); a writer that cannot see it is an error on every rank.

The bytes are those of one process gathering the full model in fp32 and calling
``safetensors.torch.save_file`` per file, as the export did before (the tests keep that route as the
reference and compare the files byte for byte at TP1, TP2, PP2, PP2 x VPP2 and TP2 x PP2). The dtype is the
config's (:func:`megatron_rl_agg.hf.config.config_dtype`: ``dtype``, else ``torch_dtype``), cast from
fp32; the written ``config.json`` carries that one dtype under both keys (``dtype`` and ``torch_dtype``).
With fp32 parameters and an fp32 checkpoint an import followed by an export is bit-exact.

Atomic: rank 0 makes ``<dir>.tmp-<pid>`` next to the target, the writers fill it, and rank 0 renames it
into place, so an interrupted export never leaves a half-written model where a server would load it. An
existing target is replaced only if an earlier export made it (it holds ``EXPORT_MARKER``); any other
existing directory is refused (on every rank, before any tensor moves), so an export never destroys data
it did not create. Any rank's failure is raised on every rank.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from megatron_rl_agg.hf import mapping, shards
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


def _refusal(out_dir: str) -> str:
    return (f"{out_dir!r} exists and was not written by an export; refusing to replace it (choose a new "
            "directory or remove it)")


def _begin(out_dir: str, plan: shards.ShardPlan, tag: int) -> str:
    """Check the target, make ``<out_dir>.tmp-<tag>`` and the plan's files in it (headers, sized);
    returns the temporary directory."""
    if os.path.exists(out_dir) and not os.path.isfile(os.path.join(out_dir, EXPORT_MARKER)):
        if not os.path.isdir(out_dir) or os.listdir(out_dir):
            raise HFExportError(_refusal(out_dir))
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = f"{out_dir}.tmp-{tag}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    shards.create_files(plan, tmp)
    return tmp


def _finish(tmp: str, out_dir: str, plan: shards.ShardPlan, config: dict, tokenizer_dir: Optional[str],
            generation_config: Optional[dict]) -> str:
    """Index, config, generation config, tokenizer files and the marker into ``tmp``; then the rename."""
    shards.write_index(plan, tmp)
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
        json.dump({"tensors": len(plan.names), "shards": len(plan.files)}, fh)
    if os.path.exists(out_dir):           # a previous export: swap, then delete the old one
        old = f"{out_dir}.old-{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)
    return out_dir


def write_hf_dir(out_dir: str, tensors: dict[str, torch.Tensor], config: dict, *,
                 tokenizer_dir: Optional[str] = None, generation_config: Optional[dict] = None,
                 max_shard_bytes: int = 5 * 2**30) -> str:
    """Write a Hugging Face model directory of ``tensors`` (one dtype) atomically, in this process (see
    the module docstring); returns ``out_dir``. The same files as :func:`export_hf` of those tensors."""
    out_dir = os.path.abspath(out_dir)
    dtypes = sorted({str(t.dtype) for t in tensors.values()})
    if len(dtypes) != 1:
        raise HFExportError(f"an export holds one dtype; the tensors for {out_dir!r} have {dtypes}")
    plan = shards.plan_shards({n: tuple(t.shape) for n, t in tensors.items()}, next(iter(tensors.values())).dtype,
                              max_shard_bytes)
    tmp = _begin(out_dir, plan, os.getpid())
    for name in plan.names:
        shards.write_tensor(plan, tmp, name, tensors[name])
    return _finish(tmp, out_dir, plan, config, tokenizer_dir, generation_config)


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
    """Export the model ``chunks`` (call on every rank) and wait until the directory is in place.

    Args:
        arch: the architecture (the imported checkpoint's ``HFCheckpoint.arch``).
        source_config / source_dir: the imported checkpoint's ``config.json`` (copied with its
            dtype keys set to the export's dtype) and directory (its ``generation_config.json`` is copied).
        tokenizer_dir: tokenizer files to copy (default ``source_dir``).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default the source config's dtype.
        max_shard_bytes: past this total the weights are sharded with an index.

    Who does what (see the module docstring): world rank 0 checks the target and writes the files'
    headers, then the ranks of DP x CP replica 0 write their stage's tensors, then rank 0 writes the
    index, config and tokenizer files and renames. Three all-reduces over the world (failure flags and
    the per-tensor written counts, which must all be 1) make every rank raise the same error, and return
    only when the directory exists.

    Returns:
        ``out_dir`` (absolute) on rank 0, None elsewhere.
    """
    from megatron_rl_agg.mcore import compat
    from megatron_rl_agg.mcore.cpu_mode import device
    from megatron_rl_agg.mcore.weights import stage_full_params
    from megatron_rl_agg.parallel import dist

    dtype = dtype or (config_dtype(source_config) if source_config else arch.torch_dtype)
    if dtype not in _DTYPES:
        raise HFExportError(f"export dtype {dtype!r}; valid: {sorted(_DTYPES)}")
    out_dir = os.path.abspath(out_dir)
    plan = shards.plan_shards({n: mapping.hf_shape(arch, n) for n in mapping.hf_names(arch)}, _DTYPES[dtype],
                              max_shard_bytes)
    world, dev = dist.world_group(), device()
    rank0 = dist.rank(world) == 0
    slot = {name: i for i, name in enumerate(plan.names)}

    # 1. rank 0: the target check, the temporary directory and the files' headers.
    tmp, error = None, None
    if rank0:
        try:
            tmp = _begin(out_dir, plan, os.getpid())
        except Exception as exc:      # every rank raises below, rank 0 its own error
            error = exc
    code = 0 if error is None else 1 if str(error) == _refusal(out_dir) else 2
    status = dist.all_reduce_sum(torch.tensor([code, os.getpid() if rank0 else 0], dtype=torch.int64,
                                              device=dev), world).cpu()
    _raise_if(int(status[0]), error, f"export to {out_dir!r} could not start on rank 0", out_dir)
    tmp = tmp or f"{out_dir}.tmp-{int(status[1])}"

    # 2. DP x CP replica 0: every stage writes its own tensors (TP-gathered one at a time).
    counts = torch.zeros(len(plan.names) + 2, dtype=torch.int64)        # per tensor; [-2] unseen dir; [-1] failed
    if _writes():
        if not os.path.isdir(tmp):
            counts[-2] = 1
        for key, layer, full in stage_full_params(chunks, compat.parallel_group("tp")[0]):
            if counts[-2] or error is not None:
                continue                              # keep joining the stage's gathers, write nothing
            try:
                padded_vocab = full.shape[0] if key in (mapping.EMBED, mapping.OUTPUT) else 0
                for name, value in mapping.split_megatron(arch, key, layer, full, padded_vocab).items():
                    shards.write_tensor(plan, tmp, name, value.to(plan.dtype))
                    counts[slot[name]] += 1
            except Exception as exc:
                error, counts[-1] = exc, 1
            del full                                  # before the next tensor is gathered
    counts = dist.all_reduce_sum(counts.to(dev), world).cpu()
    bad = [f"{n} x{int(c)}" for n, c in zip(plan.names, counts[:-2].tolist()) if c != 1]
    if counts[-2] or counts[-1] or bad:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        if counts[-2]:
            raise HFExportError(f"{int(counts[-2])} writing rank(s) cannot see {tmp!r} (made by rank 0): export "
                                "to a directory on a filesystem every rank shares")
        _raise_if(2 if counts[-1] else 0, error, f"writing the tensors of {out_dir!r} failed on "
                  f"{int(counts[-1])} rank(s)", out_dir)
        raise HFExportError(f"the export to {out_dir!r} wrote these tensors not exactly once: {bad[:8]} "
                            f"({len(bad)} of {len(plan.names)})")

    # 3. rank 0: index, config, tokenizer, marker, rename.
    written = None
    if rank0:
        try:
            tokenizer_dir = tokenizer_dir or source_dir
            written = _finish(tmp, out_dir, plan, _config_json(arch, source_config, dtype), tokenizer_dir,
                              _generation_config(source_dir, tokenizer_dir))
        except Exception as exc:
            error = exc
            shutil.rmtree(tmp, ignore_errors=True)
    status = dist.all_reduce_sum(torch.tensor([0 if error is None else 2], dtype=torch.int64, device=dev), world)
    _raise_if(int(status[0]), error, f"finishing the export to {out_dir!r} failed on rank 0", out_dir)
    return written


def _raise_if(code: int, error: Optional[BaseException], message: str, out_dir: str) -> None:
    """Raise on every rank when ``code`` (an all-reduced flag) is set: the rank that failed re-raises its
    own error; the others an ``HFExportError`` with ``message`` (code 1: the refused target's message)."""
    if not code:
        return
    if error is not None:
        raise error
    if code == 1:
        raise HFExportError(_refusal(out_dir))
    raise HFExportError(message)


def _writes() -> bool:
    """DP x CP rank 0: the one replica whose ranks write the tensors."""
    from megatron.core import parallel_state

    from megatron_rl_agg.parallel import dist

    return dist.rank(parallel_state.get_data_parallel_group(with_context_parallel=True)) == 0
