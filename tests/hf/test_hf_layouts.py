"""Hugging Face Llama / Qwen2 / Qwen3 checkpoints imported at TP1, TP2, PP2 and PP2 x VPP2 (one job of the
session's 2-process launch) give transformers' fp32 logits to 1e-5; the export from every layout is bit-exact and
transformers loads it with the same logits; deliberately wrong mappings fail the same comparison. The exported
directories equal, file for file and byte for byte, the reference route's (one process writing the full model
with ``safetensors.save_file``, tests/hf/export_reference.py), from those layouts and (the session's 4-process
launch) from TP2 x PP2, DP2 x TP2 and CP2 x PP2."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from export_reference import differing_files  # noqa: E402
from hf_models import EXTRA_FAMILIES, FAMILIES, VOCAB, hf_logits, save_hf_model  # noqa: E402

LAYOUTS = ("tp1", "tp2", "pp2", "pp2+vpp2")
TOL = 1e-5


def _tensors(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(p for p in os.listdir(model_dir) if p.endswith(".safetensors"))
    out = {}
    for f in files:
        out.update(load_file(os.path.join(model_dir, f)))
    return out


def _tokens():
    return torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))


def worker_jobs(root):
    """The Hugging Face models and their logits, then one job of the session's shared 2-process launch
    (``tests/conftest.py``)."""
    tokens = _tokens()
    for family in FAMILIES + EXTRA_FAMILIES:
        model = save_hf_model(family, str(root / family))
        torch.save({"tokens": tokens, "logits": hf_logits(model, tokens)}, root / f"{family}.pt")
    return [(2, HERE / "worker_hf_layouts.py", [root], 900), (4, HERE / "worker_hf_export.py", [root], 300)]


@pytest.fixture(scope="module")
def layout_run(shared_jobs):
    return shared_jobs, _tokens()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_import_parity_and_export_round_trip(layout_run, family):
    root, tokens = layout_run
    original = _tensors(str(root / family))
    ref = torch.load(root / f"{family}.pt")["logits"]
    for text in LAYOUTS:
        result = torch.load(root / f"result-{family}-{text}.pt")
        print(family, text, result)
        assert result["padded_vocab"] == 96                     # 90 rows + TP vocabulary padding
        assert result["diff"] <= TOL, (family, text, result)
        export = str(root / f"export-{family}-{text}")
        exported = _tensors(export)
        assert sorted(exported) == sorted(original), (family, text)
        for name, value in original.items():               # bit-exact, padding rows stripped
            assert torch.equal(exported[name], value), (family, text, name)
        assert os.path.isfile(os.path.join(export, "model.safetensors.index.json")) == (text == "pp2")
        with open(os.path.join(export, "config.json"), encoding="utf-8") as fh:
            assert json.load(fh)["vocab_size"] == VOCAB
        assert (hf_logits(export, tokens) - ref).abs().max().item() <= TOL
        reference = root / f"reference-{family}{'-sharded' if text == 'pp2' else ''}"
        assert differing_files(str(reference), export) == [], (family, text)
    wrong = torch.load(root / f"result-{family}-tp2.pt")
    assert wrong["plain_qkv_diff"] > 1e-2, wrong
    assert wrong["wrong_rope_base_diff"] > 1e-2, wrong
    if family == "llama":
        assert wrong["no_rope_scaling_diff"] > 1e-3, wrong


@pytest.mark.slow
def test_mistral_falls_out(layout_run):
    root, _ = layout_run
    result = torch.load(root / "result-mistral-tp2.pt")
    print("mistral tp2", result)
    assert result["diff"] <= TOL, result


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("text,sharded", [("tp2+pp2", True), ("dp2+tp2", False), ("cp2+pp2", False)])
def test_export_from_four_ranks_equals_the_reference_route(layout_run, family, text, sharded):
    """Stages write their own tensors in parallel (TP-gathered), one DP x CP replica writes: same bytes."""
    root, _ = layout_run
    reference = root / f"reference-{family}{'-sharded' if sharded else ''}"
    export = root / f"export4-{family}-{text}"
    assert os.path.isfile(export / "model.safetensors.index.json") == sharded
    assert differing_files(str(reference), str(export)) == [], (family, text)
    assert not [p for p in root.iterdir() if p.name.startswith(f"export4-{family}-{text}.")]   # no tmp left
