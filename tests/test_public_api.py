"""One public surface: every name the docs use for integration imports from ``megatron_rl_agg`` itself, and
every import line the docs show resolves; ``import megatron_rl_agg`` stays free of Megatron and transformers."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

import megatron_rl_agg

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# The integration names docs/megatron_integration.md, docs/packing.md, docs/models.md and the README build a
# training loop from; each must be an attribute of the top-level package.
INTEGRATION = [
    "prepare_microbatches", "make_loss_func", "forward_step", "check_megatron_setup", "reduce_metrics",
    "GPTSpec", "build_model", "build_optimizer", "init_weights", "gather_full_grads", "pack_microbatches",
    "packed_forward_step", "packed_local_layer_spec", "zigzag_indices", "check_cp_seq_length",
    "enable_cpu_mode", "load_hf_weights", "gpt_spec_from_hf", "HFCheckpoint", "read_rollouts",
]


def doc_import_lines() -> list[tuple[str, str]]:
    """``(document, import statement)`` for every import of the package inside a fenced code block."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```(?:python|py)[^\n]*\n(.*?)```", doc.read_text(), flags=re.S):
            for node in ast.walk(ast.parse(block)):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if mod and mod.split(".")[0] == "megatron_rl_agg":
                        found.append((doc.name, ast.unparse(node)))
    return found


@pytest.mark.parametrize("name", sorted(set(INTEGRATION) | set(megatron_rl_agg.__all__)))
def test_top_level_name(name):
    assert name in megatron_rl_agg.__all__, f"{name} is missing from megatron_rl_agg.__all__"
    assert getattr(megatron_rl_agg, name) is not None


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        megatron_rl_agg.nope


@pytest.mark.parametrize("doc,statement", doc_import_lines())
def test_doc_import_resolves(doc, statement):
    exec(compile(statement, doc, "exec"), {})


def test_docs_import_package_names():
    """The docs show imports at all (so the parametrized test above is not vacuous)."""
    statements = [s for _, s in doc_import_lines()]
    assert len(statements) >= 10
    assert any(s.startswith("from megatron_rl_agg import") for s in statements)


def test_import_is_cheap():
    """``import megatron_rl_agg`` (and touching a pure name) imports neither Megatron nor transformers."""
    code = ("import sys, megatron_rl_agg; megatron_rl_agg.aggregate; megatron_rl_agg.LossConfig; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
