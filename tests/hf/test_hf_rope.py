"""Rope scaling of imported Hugging Face checkpoints (single process, real Megatron-Core GPTModel).

* Llama 3.2 (rope factor 32, not Megatron's default 8): the factor reaches the model. The imported
  model's rotary frequencies equal transformers' ``inv_freq`` and its logits equal transformers' at
  positions up to 511, where the scaled frequencies matter; the same model built with the factor 8
  (what a dropped factor falls back to) or without scaling is measurably different there.
* Qwen2.5 / Qwen3 YaRN (``rope_scaling: {type: yarn, factor 4, original_max_position_embeddings 32768}``):
  Megatron-Core's GPTModel has no YaRN rotary embedding, so the import refuses it, naming the rope type
  and the supported ones, in both config layouts and from a saved checkpoint.

The tiny Llama has ``head_dim`` 16 and ``rope_theta`` 500000 (Llama 3.2's): its frequency pairs have
wavelengths 2 pi theta^(2i/16), i = 0..7, so pair 4 (4443 positions) lies in Llama-3's interpolated band
(2048..8192) and pairs 5..7 are divided by the factor.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hf_models import VOCAB, build_hf_model  # noqa: E402

from megatron_rl_agg.hf.config import HFConfigError, arch_from_config  # noqa: E402
from megatron_rl_agg.hf.load import HFCheckpoint, gpt_spec_from_hf, load_hf_weights  # noqa: E402

# Llama-3.2-1B's rope settings (config.json of meta-llama/Llama-3.2-1B)
LLAMA32_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}
# Qwen2.5's documented YaRN block (v4 layout, the "type" key), and Qwen3's (rope_type)
QWEN25_YARN = {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}
QWEN3_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
REFUSAL = "rope type 'yarn' is not supported; supported: ['default', 'llama3']"
SEQ = 512
TOL = 1e-5           # max |logit difference| relative to max |logit|
TINY = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=131072)


def _cfg(**kw):
    base = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "rope_theta": 500000.0}
    base.update(kw)
    return base


def test_llama32_rope_factor_reaches_the_spec():
    v4 = arch_from_config(_cfg(rope_scaling=LLAMA32_ROPE))
    v5 = arch_from_config(_cfg(rope_theta=None, rope_parameters={"rope_theta": 500000.0, **LLAMA32_ROPE}))
    assert v4 == v5 and v4.rope_scaling_factor == 32.0 and v4.rope_theta == 500000.0
    spec = gpt_spec_from_hf(v4)
    assert spec.rope_scaling_factor == 32.0 and spec.rotary_base == 500000.0


@pytest.mark.parametrize("cfg", [
    _cfg(model_type="qwen2", rope_theta=1e6, rope_scaling=QWEN25_YARN),
    _cfg(model_type="qwen3", head_dim=16, rope_theta=None,
         rope_parameters={"rope_theta": 1e6, **QWEN3_YARN}),
], ids=["qwen2.5-v4", "qwen3-v5"])
def test_qwen_yarn_is_refused(cfg):
    with pytest.raises(HFConfigError) as err:
        arch_from_config(cfg, "some/config.json")
    assert REFUSAL in str(err.value) and "some/config.json" in str(err.value)


def test_qwen_yarn_checkpoint_is_refused(tmp_path):
    model = build_hf_model("qwen2", **TINY)
    model.config.rope_scaling = dict(QWEN25_YARN)
    model.save_pretrained(str(tmp_path / "qwen"))
    cfg = json.loads((tmp_path / "qwen" / "config.json").read_text())
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    assert rope.get("rope_type", rope.get("type")) == "yarn", cfg        # transformers kept it
    with pytest.raises(HFConfigError, match=r"rope type 'yarn' is not supported; supported: \['default', "
                                            r"'llama3'\]"):
        HFCheckpoint(str(tmp_path / "qwen"))


@pytest.fixture(scope="module")
def megatron_tp1():
    from megatron_rl_agg.mcore import compat

    compat.initialize_distributed()
    compat.initialize_model_parallel(tp=1, pp=1)
    yield
    compat.destroy_model_parallel()


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    """A tiny Llama with Llama 3.2's rope (factor 32), saved, and transformers' logits over 512 positions."""
    path = tmp_path_factory.mktemp("llama32") / "m"
    model = build_hf_model("llama", rope_factor=32.0, **TINY)
    model.save_pretrained(str(path))
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(tokens).logits.float()
    return HFCheckpoint(str(path)), model, tokens, logits


def _imported(ckpt, **overrides):
    from megatron_rl_agg.mcore.build import build_model

    spec = gpt_spec_from_hf(ckpt.arch, max_seq_length=SEQ, **overrides)
    chunks = build_model(spec, wrap_ddp=False)
    load_hf_weights(chunks, ckpt)
    return chunks[0].eval()


def _logit_diff(model, tokens, ref) -> float:
    """max |Megatron logits - transformers logits| / max |transformers logits| (padding columns cut)."""
    with torch.no_grad():
        out = model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None)   # [1, S, V padded]
    return float((out[..., : ref.shape[-1]].float() - ref).abs().max() / ref.abs().max())


def test_llama32_import_matches_transformers(megatron_tp1, llama32):
    ckpt, hf_model, tokens, ref = llama32
    assert ckpt.arch.rope_scaling_factor == 32.0
    model = _imported(ckpt)
    hf_inv_freq = hf_model.model.rotary_emb.inv_freq.double()
    torch.testing.assert_close(model.rotary_pos_emb.inv_freq.double(), hf_inv_freq, rtol=1e-6, atol=0)
    # pairs 4..7 are scaled: against the unscaled frequencies, the factor 32 shows (pair 7 divided by 32)
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    ratio = plain / hf_inv_freq
    torch.testing.assert_close(ratio[:4], torch.ones(4, dtype=torch.float64), rtol=1e-6, atol=0)
    assert 1.5 < float(ratio[4]) < 32.0 and ratio[5:].sub(32.0).abs().max() < 1e-4, ratio
    diff = _logit_diff(model, tokens, ref)
    assert diff <= TOL, diff


@pytest.mark.parametrize("wrong", [8.0, None], ids=["megatron-default-factor-8", "no-scaling"])
def test_llama32_with_the_factor_dropped_differs(megatron_tp1, llama32, wrong):
    """The comparison above has the power to see the factor: the same weights built with Megatron's
    default factor (8) or without scaling give other logits at the long positions."""
    ckpt, hf_model, tokens, ref = llama32
    model = _imported(ckpt, rope_scaling_factor=wrong)
    diff = _logit_diff(model, tokens, ref)
    assert diff > 100 * TOL, diff
    assert not torch.allclose(model.rotary_pos_emb.inv_freq.double(),
                              hf_model.model.rotary_emb.inv_freq.double(), rtol=1e-3, atol=0)


def test_spec_override_is_what_the_wrong_variant_builds(llama32):
    """The negative control above builds what its name says (a spec identical but for the factor)."""
    ckpt = llama32[0]
    right, wrong = gpt_spec_from_hf(ckpt.arch), gpt_spec_from_hf(ckpt.arch, rope_scaling_factor=8.0)
    assert dataclasses.replace(right, rope_scaling_factor=8.0) == wrong
