"""Input checks of MoE routing replay (``megatron_rl_agg.mcore.routing_replay``): mode lookup, route
validation before any work (R3 files), padding routes and the per-token slicing in prepare_microbatches."""

from __future__ import annotations

import pytest
import torch

from megatron_rl_agg.core.config import LossConfig
from megatron_rl_agg.mcore.batch import prepare_microbatches
from megatron_rl_agg.core.routing import get_replay_mode
from megatron_rl_agg.mcore.routing_replay import check_routes, padding_routes, routes_of_map


def test_mode_lookup_lists_valid_names():
    assert get_replay_mode("r2") == "r2"
    with pytest.raises(ValueError, match=r"'r4'; valid: off, r2, r3"):
        get_replay_mode("r4")


def _routes(rows=2, seq=3, layers=2, k=2):
    return torch.stack([torch.tensor([0, 1]), torch.tensor([2, 3])])[torch.arange(rows * seq * layers) % 2].view(
        rows, seq, layers, k)


def test_check_routes_accepts_valid_and_names_each_problem():
    routes = _routes()
    check_routes(routes, 2, 3, 2, 2, num_experts=4)
    with pytest.raises(ValueError, match=r"must be \[rows, seq, moe_layers, topk\] = \[2, 3, 2, 2\], got \[2, 3, 1, 2\]"):
        check_routes(routes[:, :, :1], 2, 3, 2, 2, num_experts=4)
    bad = routes.clone()
    bad[1, 2, 0, 1] = 4
    with pytest.raises(ValueError, match=r"routes\[1, 2, 0\] holds expert 4, outside \[0, 4\)"):
        check_routes(bad, 2, 3, 2, 2, num_experts=4)
    bad[1, 2, 0, 1] = -1
    with pytest.raises(ValueError, match=r"holds expert -1"):
        check_routes(bad, 2, 3, 2, 2, num_experts=4)
    dup = routes.clone()
    dup[0, 1, 1] = torch.tensor([3, 3])
    with pytest.raises(ValueError, match=r"routes\[0, 1, 1\] repeats an expert \(\[3, 3\]\)"):
        check_routes(dup, 2, 3, 2, 2, num_experts=4)
    with pytest.raises(ValueError, match="integer expert indices"):
        check_routes(routes.float(), 2, 3, 2, 2, num_experts=4)


def test_padding_routes_and_routing_map_indices():
    pad = padding_routes((2, 3), 2)
    assert pad.shape == (2, 3, 2) and pad.tolist()[1][2] == [0, 1]
    rmap = torch.zeros(3, 4, dtype=torch.bool)
    rmap[0, [1, 3]] = rmap[1, [0, 2]] = rmap[2, [2, 3]] = True
    assert routes_of_map(rmap, 2).tolist() == [[1, 3], [0, 2], [2, 3]]
    rmap[2, 1] = True
    with pytest.raises(ValueError, match="expected 2"):
        routes_of_map(rmap, 2)


def test_prepare_microbatches_slices_routes_like_tokens_and_pads_rows():
    rows, seq = 3, 4
    routes = torch.arange(rows * seq * 2 * 2).view(rows, seq, 2, 2) % 4
    batch = dict(tokens=torch.arange(rows * seq).view(rows, seq), labels=torch.ones(rows, seq, dtype=torch.long),
                 loss_mask=torch.ones(rows, seq), advantages=torch.ones(rows), routes=routes)
    mbs = prepare_microbatches(batch, LossConfig(), 2)
    assert torch.equal(mbs[0]["routes"], routes[:2])
    assert torch.equal(mbs[1]["routes"][0], routes[2])
    assert torch.equal(mbs[1]["routes"][1], padding_routes((seq, 2), 2))   # the padding row
    with pytest.raises(ValueError, match=r"batch\['routes'\] must be \[B, S, moe_layers, topk\]"):
        prepare_microbatches(dict(batch, routes=routes[:, :3]), LossConfig(), 2)
