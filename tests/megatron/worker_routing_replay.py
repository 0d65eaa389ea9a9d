"""torchrun worker: MoE routing replay (R2) on a real Megatron MoE GPT at many layouts.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/megatron/worker_routing_replay.py OUT_DIR dp2+m2 ep2+m2 cp2+m4 pp2+m4 pp2vpp2+m4

The model is ``worker_moe_grads.moe_spec`` with 4 MoE layers ( 4 experts, top-2, aux loss on) built with
``moe_enable_routing_replay=True``. An item ``<layout>[:variant]`` (``M * D = 4``: the same four
micro-batches of two rows at every layout, since the aux loss is a per-micro-batch statistic):

1. R2 records: ``compute_logprobs(..., record_routes=True)`` on this rank's rows gives the old log-probs
   and ``routes [R, S, L, k]``; a forward hook on every router captures its ``routing_map`` per call.
2. The router is made noisy: experts 2 and 3 nearly tie (:func:`near_tie`) and the sign of their tiny
   difference flips between the two passes, so the top-2 choice changes for many tokens while the gate
   values move by ``O(EPS)``.
3. The update runs with the routes (``batch['routes']``) and, for the control, without them. Per layer,
   the fraction of tokens whose top-k set differs from the recorded one is summed over all ranks
   (every rank's router sees distinct tokens: SP shards, CP shards, DP / EP rows).

Variants: ``pack`` runs the update packed (THD; compared on the real tokens through the pack index);
``recompute`` builds with full activation recompute (the backward replays through the FIFO).

Rank 0 saves ``{"grads", "grads_free", "ppo_kl", "ppo_kl_free", "mismatch", "mismatch_free"}``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time

import torch
import torch.distributed as torch_dist

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import worker_loss_invariance as base  # noqa: E402
import worker_moe_grads as moe  # noqa: E402
from torchrun_utils import save_result  # noqa: E402

from megatron_rl_agg.mcore import compat  # noqa: E402
from megatron_rl_agg.parallel.layout import parse_layout  # noqa: E402

EPS = 1e-4
MBS = 2
SPEC = dataclasses.replace(moe.moe_spec("alltoall"), num_layers=4)      # 4 layers: pp2 x vpp2
CFG = base.LossConfig(loss_aggregation="token_mean", **base.PG)


class Capture:
    """Per MoE layer, the routing maps ``[N, E]`` of every router call, in call order."""

    def __init__(self, chunks):
        from megatron_rl_agg.mcore.routing_replay import moe_layer_numbers

        from megatron.core.utils import get_model_config

        numbers = moe_layer_numbers(get_model_config(chunks[0]))
        self.maps = {}
        self.handles = []
        for chunk in chunks:
            for module in chunk.modules():
                if getattr(module, "router_replay", None) is not None:
                    index = numbers.index(module.layer_number)
                    self.handles.append(module.register_forward_hook(self._hook(index)))

    def _hook(self, index):
        def hook(module, inputs, output):
            self.maps.setdefault(index, []).append(output[1].detach().clone())
        return hook

    def take(self):
        maps, self.maps = self.maps, {}
        return maps

    def remove(self):
        for h in self.handles:
            h.remove()


def _routers(chunks):
    for chunk in chunks:
        for module in chunk.modules():
            if getattr(module, "router_replay", None) is not None:
                yield module


def near_tie(chunks, sign):
    """Router row of expert 3 := row of expert 2 + ``sign * EPS * d`` (``d`` seeded per layer, the same at
    every layout): experts 2 and 3 nearly tie for every token, and flipping ``sign`` between the two
    passes flips their order wherever one of them is in the top 2 while moving the gate values by
    ``O(EPS)`` only: the noisy router of a policy whose weights did not change."""
    for module in _routers(chunks):
        gen = torch.Generator().manual_seed(1000 + module.layer_number)
        d = torch.randn(module.weight.shape[1], generator=gen).to(module.weight)
        with torch.no_grad():
            module.weight[3] = module.weight[2] + sign * EPS * d


def mismatch(recorded, live, layers, packed_index=None, real=None):
    """``[L, 2]`` float64: per layer, tokens whose expert set differs, and tokens compared (this rank; only
    where ``real [rows, SEQ]`` is True when given)."""
    out = torch.zeros(layers, 2, dtype=torch.float64)
    for index, rec_maps in recorded.items():
        live_maps = live[index]
        if len(live_maps) != len(rec_maps):
            raise RuntimeError(f"layer {index}: {len(rec_maps)} recorded calls, {len(live_maps)} in the update")
        for k, (rec, got) in enumerate(zip(rec_maps, live_maps)):
            if packed_index is not None:
                b = MBS
                rec = rec.view(-1, b, rec.shape[-1]).transpose(0, 1).reshape(-1, rec.shape[-1])
                rec = rec[packed_index[k]]
                got = got[:rec.shape[0]]
            keep = torch.ones(rec.shape[0], dtype=torch.bool)
            if real is not None:            # sequence-first [S * b], as the router flattens
                keep = real[k * MBS:(k + 1) * MBS].transpose(0, 1).reshape(-1)
            out[index, 0] += ((rec != got).any(-1) & keep).sum()
            out[index, 1] += keep.sum()
    return out


def r3_routes(rows):
    """``([rows, SEQ, 4, 2] routes, the same built independently)`` of rollout-file rows: random distinct top-2 experts per token and layer
    written as JSON lines, read by ``read_rollouts`` and laid out by ``build_rows`` (the trainer's path)."""
    import json
    import tempfile

    from megatron_rl_agg.trainer.rollout.rollouts import check_sample_routes, read_rollouts
    from megatron_rl_agg.trainer.step.batching import build_rows

    gen = torch.Generator().manual_seed(77)
    lines = []
    # what the update must use, built here from the file's lists: token t of a row routes as the file's
    # entry t (the model input t); positions past the row: experts 0, 1
    expected = torch.tensor([0, 1]).expand(rows, base.SEQ, 4, 2).clone()
    for i in range(rows):
        n = 2 + (i % 4) * 2 + 3                          # prompt 2 + response, <= SEQ + 1 tokens
        routes = torch.rand(n, 4, moe.EXPERTS, generator=gen).argsort(-1)[..., :2]
        for t in range(n - 1):
            expected[i, t] = routes[t]
        lines.append(json.dumps({"prompt_id": i, "prompt": [1, 2], "response": [3] * (n - 2), "reward": 1.0,
                                 "finish_reason": "stop", "routes": routes.tolist()}))
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
        fh.write("\n".join(lines) + "\n")
    samples = read_rollouts(fh.name)
    pathlib.Path(fh.name).unlink()
    check_sample_routes(samples, 4, 2, moe.EXPERTS, "r3 file")
    return build_rows(samples, base.SEQ, list(range(rows))).routes, expected


def expected_maps(routes):
    """Per layer, per micro-batch, the ``[S * b, E]`` sequence-first routing map the routes describe."""
    maps = {}
    for layer in range(routes.shape[2]):
        for k in range(0, routes.shape[0], MBS):
            r = routes[k:k + MBS, :, layer].transpose(0, 1).reshape(-1, routes.shape[-1])
            m = torch.zeros(r.shape[0], moe.EXPERTS, dtype=torch.bool)
            maps.setdefault(layer, []).append(m.scatter_(1, r, True))
    return maps


def update(chunks, share, routes, pack, capture):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rl_agg.mcore import routing_replay
    from megatron_rl_agg.mcore.batch import prepare_microbatches
    from megatron_rl_agg.mcore.loss import forward_step
    from megatron_rl_agg.mcore.packing import pack_microbatches, packed_forward_step
    from megatron_rl_agg.mcore.weights import gather_full_grads
    from megatron_rl_agg.parallel.metrics import reduce_metrics

    batch = dict(share, routes=routes) if routes is not None else dict(share)
    mbs = prepare_microbatches(batch, CFG, MBS, dp_group=parallel_state.get_data_parallel_group(),
                               cp_group=parallel_state.get_context_parallel_group())
    step, seq, rows, index = forward_step, base.SEQ, MBS, None
    if pack:
        mbs = pack_microbatches(mbs, equal_length=True)
        step, seq, rows = packed_forward_step, mbs[0]["tokens"].shape[1], 1
        index = [mb["packed_layout"].index for mb in mbs]
    for chunk in chunks:
        chunk.zero_grad_buffer()
    iterator = [iter(mbs) for _ in chunks] if len(chunks) > 1 else iter(mbs)
    capture.take()
    counter = routing_replay.MismatchCounter(chunks) if routes is not None else None
    reports = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iterator, model=chunks, num_microbatches=len(mbs),
        seq_length=seq, micro_batch_size=rows, forward_only=False)
    routing_replay.clear(chunks)
    maps = capture.take()
    metric = None
    if counter is not None:
        metric = counter.fractions()
        counter.remove()
    metrics = (reduce_metrics(reports, parallel_state.get_data_parallel_group(with_context_parallel=True))
               if parallel_state.is_pipeline_last_stage() else {})
    gathered = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, metrics)
    moe.aux_loss_total()              # clears Megatron's aux-loss tracker
    return gather_full_grads(chunks), next(m for m in gathered if m), maps, index, metric


def run_item(out_dir, item):
    from megatron.core import parallel_state

    from megatron_rl_agg.mcore.build import build_model
    from megatron_rl_agg.mcore.forward import compute_logprobs
    from megatron_rl_agg.mcore.weights import init_weights

    layout_text, _, variant = item.partition(":")
    if variant not in ("", "pack", "recompute", "r3", "mask"):
        raise ValueError(f"unknown variant {variant!r} in {item!r}; valid: '', 'pack', 'recompute', 'r3', 'mask'")
    layout = parse_layout(layout_text)
    if layout.num_microbatches * layout.data_parallel_size != 4:
        raise ValueError(f"{item}: M * D must be 4 (the same four micro-batches)")
    compat.initialize_model_parallel(layout.tp, layout.pp, layout.vpp, seed=moe.SEED, ep=layout.ep,
                                     cp=layout.cp)
    overrides = dict(moe_enable_routing_replay=True)
    if variant == "recompute":
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    layer_spec = None
    if variant == "pack":
        from megatron_rl_agg.mcore.packed_attention import packed_local_layer_spec

        layer_spec = packed_local_layer_spec(normalization="LayerNorm", num_experts=moe.EXPERTS)
    chunks = build_model(SPEC, layer_spec=layer_spec, **overrides)
    init_weights(chunks, seed=moe.SEED)
    near_tie(chunks, 1.0)
    capture = Capture(chunks)
    batch = moe.batch_for("token_mean")
    share = base.rank_share(batch, parallel_state.get_data_parallel_rank(),
                            torch_dist.get_world_size(parallel_state.get_data_parallel_group()))
    old, routes = compute_logprobs(chunks, share["tokens"], share["labels"], MBS, temperature=1.0,
                                   record_routes=True)
    recorded = capture.take()
    if variant == "r3":
        # R3: the routes of a rollout file (random distinct experts per token and layer, through the
        # trainer's reader and row builder) replace the recorded ones; expected maps built from them
        routes, expected = r3_routes(share["tokens"].shape[0])
        recorded = expected_maps(expected)
    share = dict(share, old_logprobs=old)
    share.pop("behaviour_logprobs")
    real = None
    if variant == "mask":            # the right-padding columns (token 0) are not real tokens
        real = share["tokens"] != 0
        share["token_mask"] = real.float()
    near_tie(chunks, -1.0)
    layers = routes.shape[2]
    result = {"routes_shape": list(routes.shape)}
    for tag, given in (("", routes), ("_free", None)):
        grads, metrics, live, index, metric = update(chunks, share, given, variant == "pack", capture)
        if metric is not None:
            result["metric"] = metric
        counts = torch.zeros(layers, 2, dtype=torch.float64)
        if variant != "recompute":
            counts = mismatch(recorded, live, layers, index, real)
        torch_dist.all_reduce(counts)
        result.update({f"grads{tag}": grads, f"ppo_kl{tag}": metrics["ppo_kl/mean"],
                       f"mismatch{tag}": (counts[:, 0] / counts[:, 1].clamp(min=1)).tolist(),
                       f"compared{tag}": counts[:, 1].tolist()})
    capture.remove()
    if torch_dist.get_rank() == 0:
        save_result(out_dir, item, result)
    compat.destroy_model_parallel()


def run(argv):
    """``argv = [out_dir, *items]`` in a process group that is up (``tests/worker_jobs.py``)."""
    out_dir, items = argv[0], argv[1:]
    for item in items:
        start = time.perf_counter()
        run_item(out_dir, item)
        if torch_dist.get_rank() == 0:
            print(f"{item}: {time.perf_counter() - start:.2f} s", flush=True)


def main(argv):
    compat.initialize_distributed()
    run(argv)
    torch_dist.barrier()
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
