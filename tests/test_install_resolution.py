"""Installing the package never replaces the megatron-core an environment already has.

pip's own resolver is asked, offline (``--no-index``: only what is installed can satisfy a requirement)
and without changing anything (``--dry-run --report``), to install this repository into the
environment running the tests. It must plan to install this package alone and keep the installed
megatron-core. The suite runs this on megatron-core 0.16.1 (``scripts/test.sh``) and on 0.19.2
(``scripts/test_compat.sh 0.19.2``, where the release's wheel is unpacked onto ``PYTHONPATH`` with its
``.dist-info``, so pip sees 0.19.2 installed exactly as it would in a Python 3.12 environment). A
control run adds a cap below the installed release, as the old ``<0.18`` bound did for 0.19: the
resolver must then refuse, which shows the check sees the installed release and would catch a range
that forces a downgrade.
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import subprocess
import sys

import megatron.core
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTED = ["0.16.1", "0.19.2"]


def _megatron_requirement() -> Requirement:
    reqs = [Requirement(r) for r in importlib.metadata.requires("megatron_rl_agg") or []]
    found = [r for r in reqs if r.name == "megatron-core" and r.marker is None]
    assert len(found) == 1, f"expected one unconditional megatron-core requirement, got {reqs}"
    return found[0]


def _pip_dry_run(tmp_path, *extra) -> subprocess.CompletedProcess:
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--report", str(report), "--no-index",
           "--no-build-isolation", "--disable-pip-version-check", *extra, str(ROOT)]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_supported_range_covers_the_tested_releases():
    spec = _megatron_requirement().specifier
    for version in ["0.13.0", *TESTED]:
        assert spec.contains(version), f"megatron-core {version} is outside the supported range {spec}"
    # The upper bound sits at the first release not tested.
    assert not spec.contains("0.20.0"), spec
    assert Version(megatron.core.__version__.split("+")[0]).release[:2] >= (0, 13)


def test_pip_keeps_the_installed_megatron_core(tmp_path):
    installed = importlib.metadata.version("megatron-core")
    # The distribution pip sees is the one Python imports (an unpacked wheel included).
    assert installed == megatron.core.__version__.split("+")[0]
    proc = _pip_dry_run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    plan = json.loads((tmp_path / "report.json").read_text())["install"]
    planned = {(item["metadata"]["name"].replace("_", "-").lower(), item["metadata"]["version"])
               for item in plan}
    assert planned == {("megatron-rl-agg", importlib.metadata.version("megatron_rl_agg"))}, (
        f"pip would also install {planned} (megatron-core {installed} is installed)"
    )
    assert importlib.metadata.version("megatron-core") == installed


def test_control_a_cap_below_the_installed_release_is_refused(tmp_path):
    installed = importlib.metadata.version("megatron-core")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"megatron-core<{installed}\n")
    proc = _pip_dry_run(tmp_path, "-c", str(constraints))
    assert proc.returncode != 0, "pip accepted a cap below the installed megatron-core"
    assert "megatron-core" in proc.stdout + proc.stderr
