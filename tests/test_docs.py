"""Every ```python block of docs/*.md and README.md runs.

Plain ```python blocks run on the CPU in a fresh process per document, each block in a fresh namespace
(so a block cannot lean on an earlier one). One runner process imports torch and Megatron-Core once (~7 s
on a CPU machine) and forks a child per document: each document still starts from a process in which
nothing has run but those imports. Blocks whose info string is ```python torchrun need several
processes: they run under torchrun with 2 processes (gloo) in a slow test. Other fences (bash, text, ...)
are not executed. Relative links between the pages must resolve to an existing page and heading.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(path: pathlib.Path) -> list[tuple[int, str, str]]:
    """``(line, info, code)`` of every fenced block whose info string starts with ``python``."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    out = []
    for match in FENCE.finditer(text):
        info = match.group(1).strip()
        if info.split()[:1] == ["python"]:
            out.append((text.count("\n", 0, match.start()) + 1, info, match.group(2)))
    return out


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# Imports the heavy modules once, then runs each document's blocks in a child forked for it, each block
# in a fresh namespace; writes {document: [(line, traceback)] or "exit status N"} as JSON.
RUNNER = textwrap.dedent("""
    import json, os, sys, traceback
    import torch, megatron.core.models.gpt, megatron.core.pipeline_parallel, megatron.core.optimizer
    docs = json.load(open(sys.argv[1]))
    report = {}
    for name, blocks in docs.items():
        out = sys.argv[2] + "." + str(len(report))
        pid = os.fork()
        if pid == 0:
            failed = []
            for line, code in blocks:
                try:
                    exec(compile(code, f"<block at line {line}>", "exec"), {"__name__": "__main__"})
                except BaseException:
                    failed.append((line, traceback.format_exc()))
            with open(out, "w") as f:
                json.dump(failed, f)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        report[name] = json.load(open(out)) if status == 0 else f"exit status {status}"
    json.dump(report, open(sys.argv[2], "w"))
""")


PLAIN = [(p, [(line, code) for line, info, code in python_blocks(p) if info == "python"]) for p in DOCS]
TORCHRUN = [(p, line, code) for p in DOCS for line, info, code in python_blocks(p)
            if info == "python torchrun"]


def test_info_strings_are_known():
    """A typo such as ```python-torchrun would otherwise skip a block silently."""
    bad = [(p.name, line, info) for p in DOCS for line, info, _ in python_blocks(p)
           if info not in ("python", "python torchrun")]
    assert not bad, f"unknown python info strings (use 'python' or 'python torchrun'): {bad}"


def test_docs_have_examples():
    """The concepts page is executable documentation; losing all its blocks would make this file vacuous."""
    assert len(python_blocks(ROOT / "docs" / "concepts.md")) >= 2


LINK = re.compile(r"\]\(([^)#\s]+\.md)?(?:#([^)\s]+))?\)")


def heading_anchors(path: pathlib.Path) -> set[str]:
    """GitHub-style anchors of the Markdown headings (outside code fences) of ``path``."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    anchors = set()
    for line in text.splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


@pytest.mark.parametrize("path", [p for p in DOCS if p.exists()], ids=lambda p: p.name)
def test_relative_links_resolve(path):
    """Links between the docs point at existing pages and headings (external URLs are not checked)."""
    broken = []
    for target, anchor in LINK.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        page = (path.parent / target) if target else path
        if not page.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and anchor not in heading_anchors(page):
            broken.append(f"{target}#{anchor} (no such heading)")
    assert not broken, f"{path.name}: broken links: {broken}"


@pytest.fixture(scope="module")
def plain_reports(tmp_path_factory):
    """Every document's plain blocks, run by RUNNER (one process, a fork per document)."""
    tmp = tmp_path_factory.mktemp("docs")
    (tmp / "blocks.json").write_text(json.dumps({p.name: b for p, b in PLAIN if b}))
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp / "blocks.json"), str(tmp / "report.json")],
                          cwd=tmp, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and (tmp / "report.json").exists(), proc.stderr[-4000:]
    return json.loads((tmp / "report.json").read_text()), proc.stderr


@pytest.mark.parametrize("path", [p for p, b in PLAIN if b], ids=lambda p: p.name)
def test_python_blocks_run(path, plain_reports):
    reports, stderr = plain_reports
    failed = reports[path.name]
    assert not isinstance(failed, str), f"{path.name}: its process ended with {failed}\n{stderr[-4000:]}"
    report = "\n".join(f"{path.name}:{line}\n{tb}" for line, tb in failed)
    assert not failed, report


@pytest.mark.slow
@pytest.mark.parametrize("path,line,code",
                         [pytest.param(p, n, c, id=f"{p.name}:{n}") for p, n, c in TORCHRUN])
def test_torchrun_blocks_run(path, line, code, tmp_path):
    from torchrun_utils import run_torchrun

    script = tmp_path / f"{path.stem}_line{line}.py"
    script.write_text(code)
    run_torchrun(script, 2, timeout=300, env={"CUDA_VISIBLE_DEVICES": ""})
