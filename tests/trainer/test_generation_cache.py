"""KV-cached on-policy generation (Megatron-Core's StaticInferenceContext) against the recompute path:
the same tokens for the same noise, from logits within 1e-5, at TP1 (DP2), TP2, PP2 and PP2 x VPP2, all
in one job (``worker_generation.py``) of the session's 2-process launch."""

import pathlib

import pytest

from tests.torchrun_utils import load_result

pytestmark = pytest.mark.slow

WORKER = pathlib.Path(__file__).with_name("worker_generation.py")
LAYOUTS = ("tp1", "tp2", "pp2", "pp2vpp2")


def worker_jobs(directory):
    """One job of the session's shared 2-process launch (``tests/conftest.py``)."""
    return [(2, WORKER, [directory], 600)]


@pytest.fixture(scope="module")
def results(shared_jobs):
    return {name: load_result(shared_jobs, name) for name in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cached_tokens_equal_recompute(results, layout):
    r = results[layout]
    assert r["cached"] == r["recompute"]
    assert r["finish"][0] == r["finish"][1]
    # the draws are varied: several EOS stops and several full-length responses
    lengths = [len(x) for x in r["recompute"]]
    assert len(set(lengths)) >= 3 and max(lengths) == int(r["max_new"])
    assert float(r["max_logit_diff"]) <= 1e-5


def test_layouts_draw_the_same_tokens(results):
    """Layout-independent weights and counter-based noise: every layout draws the TP1 tokens."""
    for layout in LAYOUTS[1:]:
        assert results[layout]["cached"] == results["tp1"]["cached"], layout
