"""The export's planned safetensors files (``megatron_rl_agg.hf.shards``) are byte for byte what one
process writing every tensor with ``safetensors.torch.save_file`` wrote (tests/hf/export_reference.py), at
any shard size, for each export dtype; tensors written in any order, at their planned offsets."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from export_reference import differing_files, reference_write  # noqa: E402

from megatron_rl_agg.hf import shards  # noqa: E402
from megatron_rl_agg.hf.export import HFExportError, write_hf_dir  # noqa: E402


def _tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    names = ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    for i in (0, 1, 2, 10, 11):         # "model.layers.10." sorts before "model.layers.2."
        names += [f"model.layers.{i}.mlp.up_proj.weight", f"model.layers.{i}.input_layernorm.weight",
                  f"model.layers.{i}.self_attn.q_proj.bias"]
    shapes = [(int(torch.randint(1, 40, (1,), generator=g)),) + ((7,) if k % 2 else ()) for k in range(len(names))]
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in zip(names, shapes)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_shard_bytes", [1, 300, 2000, 5 * 2**30])
def test_planned_files_equal_save_file(tmp_path, dtype, max_shard_bytes):
    tensors = _tensors(dtype)
    config = {"model_type": "llama"}
    ref = reference_write(str(tmp_path / "ref"), tensors, config, max_shard_bytes=max_shard_bytes)
    out = write_hf_dir(str(tmp_path / "out"), tensors, config, max_shard_bytes=max_shard_bytes)
    assert differing_files(ref, out) == []
    plan = shards.plan_shards({n: t.shape for n, t in tensors.items()}, dtype, max_shard_bytes)
    if max_shard_bytes > 10**6:
        assert plan.files == ("model.safetensors",)
    if max_shard_bytes == 1:
        assert len(plan.files) == len(tensors)           # one tensor per file when each is over the limit


def test_tensors_land_at_their_offsets_in_any_order(tmp_path):
    """Writers fill the files in any order (as the pipeline stages do): same bytes as the reference."""
    tensors = _tensors(torch.float32)
    plan = shards.plan_shards({n: t.shape for n, t in tensors.items()}, torch.float32, 600)
    (tmp_path / "out").mkdir()
    shards.create_files(plan, str(tmp_path / "out"))
    for name in reversed(plan.names):
        shards.write_tensor(plan, str(tmp_path / "out"), name, tensors[name])
    shards.write_index(plan, str(tmp_path / "out"))
    ref = reference_write(str(tmp_path / "ref"), tensors, {}, max_shard_bytes=600)
    names = set(differing_files(ref, str(tmp_path / "out")))
    assert names == {"config.json", "megatron_rl_agg_export.json"}      # written by the export's last phase


def test_plan_errors_name_the_bad_tensor(tmp_path):
    tensors = _tensors(torch.float32)
    plan = shards.plan_shards({n: t.shape for n, t in tensors.items()}, torch.float32, 600)
    (tmp_path / "out").mkdir()
    shards.create_files(plan, str(tmp_path / "out"))
    with pytest.raises(KeyError, match="'nope' is not in the export plan"):
        shards.write_tensor(plan, str(tmp_path / "out"), "nope", torch.zeros(1))
    with pytest.raises(ValueError, match=r"'model.norm.weight' is \(3,\) torch.float32; the export plan has"):
        shards.write_tensor(plan, str(tmp_path / "out"), "model.norm.weight", torch.zeros(3))
    with pytest.raises(ValueError, match=r"export dtype torch.float64; valid"):
        shards.plan_shards({"w": (2,)}, torch.float64, 10)
    with pytest.raises(HFExportError, match=r"one dtype; the tensors for .* have \['torch.bfloat16', 'torch.float32'\]"):
        write_hf_dir(str(tmp_path / "mixed"), {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.bfloat16)}, {})


def test_a_file_fills_up_to_exactly_the_limit(tmp_path):
    """Three 40-byte tensors at 80 bytes per file: two files ([a, b], [c]), as the reference cuts them."""
    tensors = {n: torch.full((10,), float(i)) for i, n in enumerate("abc")}
    plan = shards.plan_shards({n: t.shape for n, t in tensors.items()}, torch.float32, 80)
    assert [plan.file_of[n] for n in "abc"] == ["model-00001-of-00002.safetensors"] * 2 + \
        ["model-00002-of-00002.safetensors"]
    ref = reference_write(str(tmp_path / "ref"), tensors, {}, max_shard_bytes=80)
    assert differing_files(ref, write_hf_dir(str(tmp_path / "out"), tensors, {}, max_shard_bytes=80)) == []
