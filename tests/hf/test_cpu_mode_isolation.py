"""The CPU mode leaves other libraries alone: transformers' ``from_pretrained`` in a process where the CPU
mode and Megatron's process groups are up gives the same weights, buffers and logits as in a plain process.

Before the factory redirect was limited to Megatron's modules, a global ``torch.tensor`` wrapper made
transformers leave the rotary ``inv_freq`` buffer uninitialized (garbage values, wrong logits, no error).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hf_models import save_hf_model  # noqa: E402

SCRIPT = r"""
import sys, torch
model_dir, out, mode = sys.argv[1:4]
originals = {name: getattr(torch, name) for name in ("tensor", "zeros", "arange", "empty")}
if mode == "cpu_mode":
    from megatron_rl_agg.mcore import compat, cpu_mode
    compat.initialize_distributed()
    compat.initialize_model_parallel(1, 1)
    assert cpu_mode.cpu_mode_enabled()
    assert all(getattr(torch, n) is f for n, f in originals.items()), "torch's factories were replaced"
    import megatron.core.utils as mutils            # Megatron's own calls still get the CPU redirect
    assert mutils.torch.zeros(2, device="cuda").device.type == "cpu"
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
tokens = torch.arange(24).view(2, 12) % 90
with torch.no_grad():
    logits = model(tokens).logits
state = {k: v.clone() for k, v in model.state_dict().items()}
state.update({"buffer:" + k: v.clone() for k, v in model.named_buffers()})
torch.save({"state": state, "logits": logits}, out)
if mode == "cpu_mode":
    import torch.distributed as d
    compat.destroy_model_parallel(); d.destroy_process_group()
"""


def _run(model_dir, out, mode):
    repo = str(HERE.parents[1])
    # The caller's PYTHONPATH is kept behind the repository: the compatibility run puts its unpacked
    # megatron-core there (scripts/test_compat.sh).
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "NO_VCS_VERSION": "1"}
    subprocess.run([sys.executable, "-c", SCRIPT, str(model_dir), str(out), mode], check=True, cwd=repo,
                   env=env, timeout=300)
    return torch.load(out)


def test_from_pretrained_unchanged_by_cpu_mode(tmp_path):
    save_hf_model("llama", str(tmp_path / "llama"))
    plain = _run(tmp_path / "llama", tmp_path / "plain.pt", "plain")
    cpu = _run(tmp_path / "llama", tmp_path / "cpu.pt", "cpu_mode")
    assert any("inv_freq" in k for k in plain["state"])
    assert sorted(plain["state"]) == sorted(cpu["state"])
    for key, value in plain["state"].items():
        assert torch.equal(value, cpu["state"][key]), key
    assert torch.equal(plain["logits"], cpu["logits"])
