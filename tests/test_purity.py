"""The math modules never touch torch.distributed or Megatron: collectives live in dist.py, Megatron glue
in the mcore/ modules. Checked on the source (AST), so a stray import cannot hide."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "megatron_rl_agg"
PURE = ["core/aggregation.py", "core/advantages.py", "core/policy_losses.py", "core/kl.py", "core/logits.py", "core/metrics.py", "core/config.py",
        "core/context_parallel.py",
        "hf/config.py", "hf/mapping.py", "hf/rewards.py", "hf/prompts.py"]


def distributed_or_megatron_uses(path: pathlib.Path) -> set[str]:
    """Imports of megatron / torch.distributed / the plugin's Megatron glue, and torch.distributed.X
    attribute accesses, found in the module's code (docstrings and comments do not count)."""
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
        found.update(m for m in mods if m == "megatron" or m.startswith(("megatron.", "torch.distributed",
                                                                          "megatron_rl_agg.megatron"))
                     or m in ("megatron_rl_agg.mcore.spec", "megatron_rl_agg.mcore.build",
                              "megatron_rl_agg.mcore.weights"))
    return found


@pytest.mark.parametrize("name", PURE)
def test_pure_module_imports(name):
    path = PKG / name
    assert path.exists(), f"{name} is part of the package layout"
    assert not distributed_or_megatron_uses(path)


def test_only_dist_calls_torch_distributed():
    """Outside the Megatron glue (mcore/, audit/, trainer/), only dist.py may use torch.distributed."""
    glue = {"dist.py"}
    offenders = {p.name: sorted(u) for p in PKG.rglob("*.py")
                 if p.name not in glue and not {"mcore", "audit", "trainer"} & set(p.parts)
                 and any("torch.distributed" in u for u in distributed_or_megatron_uses(p))}
    assert not offenders
