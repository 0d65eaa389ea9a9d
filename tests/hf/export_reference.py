"""The reference route of the export tests: how an export was written before the per-stage writers,
kept here (not in the package) so the tests compare the new files against it byte for byte.

One process holds every Hugging Face tensor (``full_to_hf`` of the full model), cuts the sorted names
greedily into files of at most ``max_shard_bytes`` and writes each with ``safetensors.torch.save_file``
(``metadata={"format": "pt"}``), plus the index, config, generation config, tokenizer files and marker.
"""

from __future__ import annotations

import json
import os
import shutil

import torch


def reference_write(out_dir: str, tensors: dict[str, torch.Tensor], config: dict, *, tokenizer_dir=None,
                    generation_config=None, max_shard_bytes: int = 5 * 2**30) -> str:
    from safetensors.torch import save_file

    from megatron_rl_agg.hf.export import EXPORT_MARKER, TOKENIZER_FILES

    os.makedirs(out_dir)
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    if generation_config is not None:
        with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as fh:
            json.dump(generation_config, fh, indent=2)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer_dir, name)):
                shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
    with open(os.path.join(out_dir, EXPORT_MARKER), "w", encoding="utf-8") as fh:
        json.dump({"tensors": len(tensors), "shards": len(shards)}, fh)
    return out_dir


def differing_files(a: str, b: str) -> list[str]:
    """Files present in only one of the two directories or whose bytes differ (empty: equal)."""
    names_a, names_b = set(os.listdir(a)), set(os.listdir(b))
    out = sorted(names_a ^ names_b)
    for name in sorted(names_a & names_b):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            if fa.read() != fb.read():
                out.append(name)
    return out
