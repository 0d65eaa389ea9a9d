"""The package layout is the architecture (docs/index.md#architecture), checked on the source.

Every ``import`` of the package's own modules is read from the AST, module-level and function-level alike
(a lazy import is still a dependency), and checked against the declared direction of the subpackages; the
module graph must have no cycle; no module may exceed the size limit.
"""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "megatron_rl_agg"
NAME = "megatron_rl_agg"

# What each part of the package may import of the package (besides itself). Read top-down: a part may only
# import the parts above it in this table.
ALLOWED = {
    "core": set(),
    "parallel": {"core"},
    "mcore": {"core", "parallel"},
    "hf": {"core", "parallel", "mcore"},
    "audit": {"core", "parallel", "mcore"},
    "engine": {"core", "parallel", "hf"},
    "trainer": {"core", "parallel", "mcore", "hf", "engine"},
    "cli": {"core", "parallel", "mcore", "hf", "audit", "engine", "trainer"},
    # the public surface: lazy attribute table only (PEP 562), eager imports from core/parallel
    "__init__": {"core", "parallel", "mcore", "hf", "trainer"},
}
# Inside the trainer, the stages: the command line knows nothing of the rest; rollouts may read the
# flags; a step uses rollouts; the loop drives everything.
TRAINER_ALLOWED = {
    "cli": set(),
    "rollout": {"cli"},
    "step": {"cli", "rollout"},
    "loop": {"cli", "rollout", "step"},
}
MAX_LINES = 500


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def own_imports(path: pathlib.Path, mods: dict, me: str | None = None) -> set[str]:
    """The package modules ``path`` imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    me = me or module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == NAME)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{me}: relative import of {node.module!r} (use absolute imports)"
            if node.module and node.module.split(".")[0] == NAME:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if sub in mods else node.module)
    found.discard(me)
    return found


def part(mod: str) -> str:
    """The part of the package a module belongs to: its first subpackage, or the top-level module's name."""
    parts = mod.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def trainer_stage(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "trainer" else None


def direction_violations(mods: dict[str, pathlib.Path]) -> list[str]:
    bad = []
    for mod, path in mods.items():
        for target in own_imports(path, mods, mod):
            src, dst = part(mod), part(target)
            if target == NAME:
                bad.append(f"{mod} imports the top-level package (import the defining module)")
            elif src != dst and dst not in ALLOWED[src]:
                bad.append(f"{mod} -> {target}: {src} may import only {sorted(ALLOWED[src])}")
            elif src == dst == "trainer":
                s, d = trainer_stage(mod), trainer_stage(target)
                if s and d and s != d and d not in TRAINER_ALLOWED.get(s, set()):
                    bad.append(f"{mod} -> {target}: trainer.{s} may import only {sorted(TRAINER_ALLOWED[s])}")
    return bad


def test_imports_follow_the_declared_direction():
    mods = modules()
    assert set(part(m) for m in mods) <= set(ALLOWED), "a new part of the package must be declared"
    bad = direction_violations(mods)
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    mods = modules()
    graph = {m: {t for t in own_imports(p, mods) if t in mods and t != NAME} for m, p in mods.items()}
    # A package __init__ importing its own submodules is not a dependency of those submodules on it.
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_size(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by what it owns (limit {MAX_LINES})"


def test_the_checker_sees_lazy_and_upward_imports(tmp_path):
    """The walk finds an import inside a function, and the direction rule flags an upward one."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from megatron_rl_agg.mcore import loss\n")
    mods = dict(modules(), **{"megatron_rl_agg.core.probe": probe})
    assert "megatron_rl_agg.mcore.loss" in own_imports(probe, mods, "megatron_rl_agg.core.probe")
    bad = direction_violations(mods)
    assert any(b.startswith("megatron_rl_agg.core.probe -> megatron_rl_agg.mcore.loss") for b in bad)
