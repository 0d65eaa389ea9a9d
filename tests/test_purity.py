"""The pure-torch core never touches torch.distributed or Megatron: collectives live in parallel/dist.py,
Megatron glue in mcore/. Checked on the source (AST), so a stray import cannot hide, and in a fresh process,
so an import made by something core imports cannot hide either."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "megatron_rl_agg"
CORE = sorted(p.relative_to(PKG).as_posix() for p in (PKG / "core").glob("*.py"))
# The Hugging Face modules that read configs, map names, score and tokenize: no Megatron, no collectives.
PURE_HF = ["hf/config.py", "hf/mapping.py", "hf/rewards.py", "hf/reward_pool.py", "hf/prompts.py"]


def forbidden_uses(path: pathlib.Path) -> set[str]:
    """Imports of megatron, torch.distributed, or any module of the package outside ``core/``, and
    torch.distributed.X attribute accesses, found in the module's code (docstrings and comments do not
    count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        mods = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and node.attr == "distributed" \
                and isinstance(node.value, ast.Name) and node.value.id == "torch":
            found.add("torch.distributed (attribute)")
        found.update(m for m in mods if m == "megatron" or m.startswith(("megatron.", "torch.distributed"))
                     or (m.startswith("megatron_rl_agg.") and not m.startswith("megatron_rl_agg.core")))
    return found


def test_core_is_the_whole_folder():
    assert "core/aggregation.py" in CORE and "core/policy_losses.py" in CORE and len(CORE) >= 10


@pytest.mark.parametrize("name", CORE + PURE_HF)
def test_pure_module_imports(name):
    path = PKG / name
    assert path.exists(), f"{name} is part of the package layout"
    uses = forbidden_uses(path)
    if name.startswith("hf/"):  # hf may use its own pure siblings and core
        uses = {u for u in uses if not u.startswith(("megatron_rl_agg.hf.config", "megatron_rl_agg.hf.mapping",
                                                       "megatron_rl_agg.hf.rewards", "megatron_rl_agg.hf.reward_pool",
                                                       "megatron_rl_agg.hf.prompts"))}
    assert not uses


def test_core_imports_no_collectives_or_megatron_at_run_time():
    """Importing every core module pulls in no Megatron and none of the package outside core/. The top-level
    package's own ``__init__`` (the public surface, which also exports ``parallel`` names) is replaced by an
    empty package first, so only what core itself imports is counted."""
    mods = [f"megatron_rl_agg.core.{p[len('core/'):-3]}" for p in CORE if not p.endswith("__init__.py")]
    code = ("import importlib, sys, types\n"
            "pkg = types.ModuleType('megatron_rl_agg'); pkg.__path__ = ['megatron_rl_agg']\n"
            "sys.modules['megatron_rl_agg'] = pkg\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'megatron' or "
            "(m.startswith('megatron_rl_agg.') and not m.startswith('megatron_rl_agg.core'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_only_dist_calls_torch_distributed():
    """Outside the Megatron glue (mcore/), the audit's runner and the trainer, only parallel/dist.py may use
    torch.distributed."""
    offenders = {p.relative_to(PKG).as_posix(): sorted(forbidden_uses(p)) for p in PKG.rglob("*.py")
                 if p != PKG / "parallel" / "dist.py" and not {"mcore", "audit", "trainer"} & set(p.parts)
                 and any("torch.distributed" in u for u in forbidden_uses(p))}
    assert not offenders
