"""A layout teardown releases everything the layout created (``compat.destroy_model_parallel``).

A process that runs layout after layout (the trainer's ``run`` is re-entrant; the audit and these tests
run dozens of layouts per launch) must not keep the process groups of the earlier ones: Megatron's own
``destroy_model_parallel`` only drops its references (the control below: ~20 groups stay registered),
and a destroyed gloo group keeps its threads and sockets until the model that references it is freed by
the cycle collector. The worker (``worker_teardown.py``, 2 processes, TP2) counts registered groups,
threads and open file descriptors after each teardown.
"""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from torchrun_utils import load_result  # noqa: E402

pytestmark = pytest.mark.slow

WORKER = pathlib.Path(__file__).with_name("worker_teardown.py")
SLACK = {"threads": 2, "fds": 4}     # one-off helpers; a leaked TP2 layout is ~45 threads and ~70 fds


def worker_jobs(directory):
    """This module's share of the session's shared launches (``tests/conftest.py``)."""
    return [(2, WORKER, [directory], 120)]


@pytest.fixture(scope="module")
def ranks(shared_jobs):
    return load_result(shared_jobs, "teardown")["ranks"]


def test_a_dropped_layout_leaves_nothing_behind(ranks):
    for rank, got in enumerate(ranks):
        base, dropped = got["baseline"], got["dropped"]
        assert all(c["groups"] == base["groups"] for c in dropped), (rank, dropped)
        for key, slack in SLACK.items():
            # the first teardown keeps a few once-per-process helpers; none after it adds anything
            assert dropped[-1][key] <= dropped[0][key] + slack, (rank, key, dropped)
            assert dropped[0][key] < got["during"][key] - 20, (rank, key, got["during"])


def test_a_model_kept_past_its_teardown_is_freed_at_the_next(ranks):
    """The worker pattern: the model is still referenced at teardown and replaced by the next layout's.
    What stays is at most one layout's worth, not one per layout."""
    for rank, got in enumerate(ranks):
        kept = got["kept"]
        assert all(c["groups"] == got["baseline"]["groups"] for c in kept), (rank, kept)
        for key, slack in SLACK.items():
            assert kept[-1][key] <= kept[0][key] + slack, (rank, key, kept)


def test_megatrons_own_teardown_keeps_its_groups_registered_ours_releases_them(ranks):
    for rank, got in enumerate(ranks):
        own, ours = got["megatron"]["own"], got["megatron"]["then_ours"]
        assert own["groups"] >= got["baseline"]["groups"] + 10, (rank, own)      # the control
        assert ours["groups"] == got["baseline"]["groups"], (rank, ours)
        for key, slack in SLACK.items():
            assert ours[key] <= got["dropped"][-1][key] + slack, (rank, key, ours)
