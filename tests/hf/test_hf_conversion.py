"""The README's conversion command, run as written: ``python scripts/train_grpo.py --hf-checkpoint
models/Qwen2.5-0.5B-Instruct --train-iters 0 --save-hf runs/qwen/hf-converted`` in a directory where
``models/Qwen2.5-0.5B-Instruct`` is a tiny random Qwen2 model (fp32). The export must exist, carry one
dtype in ``config.json``, load in transformers in that dtype, and hold the source's tensors bit for bit
(fp32 in, fp32 parameters, fp32 out). The bf16 conversion and ``--load CKPT --train-iters N --save-hf`` run
in ``tests/hf/test_hf_trainer.py``'s launch.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from hf_models import assert_export_equals, save_hf_model  # noqa: E402


def documented_command(path: pathlib.Path) -> list[str]:
    """The one ``train_grpo.py ... --train-iters 0 ...`` command of a ```bash block of ``path``."""
    text = path.read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)
    commands = [c for b in blocks for c in b.replace("\\\n", " ").splitlines()
                if "train_grpo.py" in c and "--train-iters 0" in c]
    assert len(commands) == 1, (path, commands)
    return shlex.split(commands[0])


@pytest.mark.slow
def test_readme_conversion_command_writes_the_export(tmp_path):
    argv = documented_command(REPO / "README.md")
    assert argv == documented_command(REPO / "docs" / "models.md")
    assert argv[:2] == ["python", "scripts/train_grpo.py"]
    source = tmp_path / argv[argv.index("--hf-checkpoint") + 1]
    save_hf_model("qwen2", str(source), seed=11)
    (tmp_path / "scripts").symlink_to(REPO / "scripts")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nothing to train" not in proc.stdout
    assert_export_equals(tmp_path / argv[argv.index("--save-hf") + 1], source, torch.float32)
