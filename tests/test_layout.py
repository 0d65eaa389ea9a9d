"""The one layout grammar (``megatron_rl_agg.parallel.layout``): ``parse_layout`` reads one layout,
``parse_layouts`` a list, ``str(layout)`` prints the canonical spelling, and ``parse_layout(str(L)) == L``
for every layout, spelled in the tests, benchmarks, docs and audit defaults or built systematically."""

import itertools

import pytest

from megatron_rl_agg.audit.plan import DEFAULT_LAYOUTS
from megatron_rl_agg.parallel.layout import Layout, parse_layout, parse_layouts

# Every layout string of the tests (workers' items without their ':variant'), the docs, README, the
# scripts and the audit defaults, as written there (lists go through parse_layouts).
USED = [
    # audit defaults, tests/test_audit.py
    DEFAULT_LAYOUTS, "dp2+m3", "pp2+vpp2+m3", "pp4", "tp3", "cp2", "ep2", "ep2+dp2+m3", "ep2+tp2", "ep2+m2",
    "dp2+m2 tp2+m2 pp2vpp2m4 cp2+m2", "dp2+m2 tp2", "dp2+m2 pp2+m2", "cp2+m2 dp2+m2",
    # tests/megatron/test_layout_grads.py, worker_loss_invariance.py, test_moe_grads.py, test_moe_model.py
    "dp1+m1", "dp1+m4", "dp2+m2", "tp2", "pp2+m4", "pp2+vpp2+m4", "cp2+m2", "tp2+pp2+m4", "dp2+pp2+m2",
    "dp2+tp2+m2", "cp2+dp2+m2", "cp2+tp2+m2", "tp2+pp2+dp2+m8", " PP2+VPP2+m4 ", "cp2+m4", "cp2+tp2+m4",
    "cp2+pp2+m4", "dp2+ep2", "tp2+ep2+m2", "pp2+ep2+m4", "dp2",
    # tests/hf, tests/megatron/test_packing_equal.py, test_megatron_contract.py
    "tp1", "pp2", "pp2+vpp2",
    # docs/audit.md, docs/faq.md, README.md, scripts/gpu_smoke.sh
    "m4 dp2+m2 tp2 pp2vpp2m4", "dp2+tp2+m2 dp4+m4", "dp8+m2 dp2+tp4+m4 tp2+pp4+m8 dp2+pp2+vpp2+m4",
    "dp2,m4,tp2,pp2,pp2vpp2", "m2 ep2+m2 ep2+dp2 ep2+tp2+m2", "cp2 cp2+dp2", "dp2+m2,tp2,pp2+m4,pp2vpp2m4",
    "dp2+m4,tp2", "pp2vpp2m4;pp2+vpp2+m4", "ep2,ep2+dp2,ep2+tp2", "cp2 cp2+dp2 cp2+tp2 cp2+pp2", "cp2 ep2",
    "cp2+pp2+m4",
]


def _systematic():
    stages = [(1, None)] + [(pp, vpp) for pp in (2, 4) for vpp in (None, 2, 3)]
    for tp, (pp, vpp), cp, dp, ep, m in itertools.product((1, 2, 4), stages, (1, 2), (1, 2, 8), (1, 2),
                                                            (1, 2, 4, 8)):
        yield Layout(tp=tp, pp=pp, vpp=vpp, cp=cp, dp=dp, ep=ep, num_microbatches=m)


@pytest.mark.parametrize("text", USED)
def test_used_layouts_round_trip(text):
    layouts = parse_layouts(text)
    for layout in layouts:
        assert parse_layout(str(layout)) == layout, (text, str(layout))
    assert parse_layouts(" ".join(str(lay) for lay in layouts)) == layouts


def test_every_layout_round_trips():
    layouts = list(_systematic())
    assert len(layouts) == 1008
    for layout in layouts:
        assert parse_layout(str(layout)) == layout, str(layout)
    assert len({str(lay) for lay in layouts}) == len(layouts)     # one spelling per layout
    assert parse_layouts(",".join(str(lay) for lay in layouts)) == layouts


@pytest.mark.parametrize("text", ["m1", "m4", "dp2+m2", "tp2", "pp2+vpp2+m4", "dp2+tp2+pp2+m8", "cp2",
                                  "cp2+dp2+m2", "cp2+tp2", "cp2+pp2+m4", "ep2", "ep2+dp2", "ep2+tp2+m2"])
def test_canonical_spelling_round_trips(text):
    (layout,) = parse_layouts(text)
    assert str(layout) == text
    assert parse_layouts(str(layout)) == [layout]
    assert parse_layout(text) == layout


def test_virtual_stages_always_print_m():
    # With vpp an omitted m is pp, so m is written even when it is 1 (else "pp2+vpp2" would read back as m2).
    assert str(Layout(pp=2, vpp=2, num_microbatches=1)) == "pp2+vpp2+m1"
    assert parse_layout("pp2+vpp2") == Layout(pp=2, vpp=2, num_microbatches=2)
    assert str(Layout()) == "m1" and str(Layout(dp=2)) == "dp2"


@pytest.mark.parametrize("text", ["dp2,m2", "dp2 m2", "dp2;m2", "pp2,vpp2,m4"])
def test_old_comma_spelling_of_one_layout_is_refused(text):
    with pytest.raises(ValueError) as err:
        parse_layout(text)
    message = str(err.value)
    assert repr(text) in message and "joined by '+'" in message and "parse_layouts" in message
    if text != "pp2,vpp2,m4":      # as a list: two layouts (vpp2 alone is not one)
        assert parse_layouts(text) == [Layout(dp=2), Layout(num_microbatches=2)]


# ----------------------------------------------------------------------------------------------
# the grammar as the audit's --layouts reads it (moved from tests/test_audit.py)
# ----------------------------------------------------------------------------------------------

def test_compact_and_plus_spellings_agree():
    expected = Layout(pp=2, vpp=2, num_microbatches=4)
    for text in ("pp2vpp2m4", "pp2+vpp2+m4", "PP2VPP2+m4", "m4pp2vpp2"):
        assert parse_layouts(text) == [expected], text


def test_layout_separators_and_duplicates():
    got = parse_layouts(["dp2+m4 tp2;pp2vpp2m2", "  tp2  "])
    assert got == [Layout(dp=2, num_microbatches=4), Layout(tp=2), Layout(pp=2, vpp=2, num_microbatches=2)]
    assert [lay.world_size for lay in got] == [2, 2, 2]
    assert parse_layouts("dp2+tp2+pp2")[0].world_size == 8


def test_issue_comma_list_is_five_layouts():
    # The issue's own spelling: commas separate layouts, "m4" alone is DP1 with 4 micro-batches.
    assert parse_layouts("dp2,m4,tp2,pp2,pp2vpp2") == [
        Layout(dp=2), Layout(num_microbatches=4), Layout(tp=2), Layout(pp=2),
        Layout(pp=2, vpp=2, num_microbatches=2)]   # with vpp, an omitted m is pp (interleaved schedule)
    # A factor given twice inside one layout is an error with a hint.
    with pytest.raises(ValueError, match=r"sets pp more than once.*separate them with ',', ';' or spaces"):
        parse_layouts("pp2vpp2pp4")


def test_context_parallel_layouts():
    assert parse_layouts("cp2 cp2+dp2 cp2tp2 cp2+pp2+m4") == [
        Layout(cp=2), Layout(cp=2, dp=2), Layout(cp=2, tp=2), Layout(cp=2, pp=2, num_microbatches=4)]
    assert [lay.world_size for lay in parse_layouts("cp2 cp2+dp2")] == [2, 4]


@pytest.mark.parametrize("text,match", [("cp0", "cp=0"), ("dp2,x3", "bad layout"),
                                        ("tp", "bad layout"), ("vpp2", "vpp"), ("dp0", "dp=0"),
                                        (" ; ", "no layout")])
def test_bad_layouts(text, match):
    with pytest.raises(ValueError, match=match):
        parse_layouts(text)


def test_ep_factor_multiplies_the_process_count():
    assert parse_layouts("ep2,ep2+dp2,ep2+tp2") == [Layout(ep=2), Layout(ep=2, dp=2), Layout(ep=2, tp=2)]
    assert [lay.world_size for lay in parse_layouts("ep2 ep2dp2 tp2ep2")] == [2, 4, 4]


@pytest.mark.parametrize("text,match", [("xp2", "bad layout 'xp2' at 'xp2'"), ("", "empty layout in ''"),
                                        ("tp2+tp4", "sets tp more than once"),
                                        ("tp0", "Layout.tp=0 must be >= 1")])
def test_parse_layout_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_layout(text)
