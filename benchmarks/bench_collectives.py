"""Count the collectives the plugin adds per optimizer step and per micro-batch.

Runs under torchrun with 2 ranks (gloo on CPU, NCCL on GPUs). Every ``torch.distributed`` collective is
wrapped by a counter that records the call, the process group it ran on and the code that was running:

* ``prepare``:  ``batch.prepare_microbatches`` (global weights; once per optimizer step);
* ``loss``:     ``megatron_loss.loss_func`` (once per micro-batch, on the last pipeline stage);
* ``metrics``:  ``metrics.reduce_metrics`` (once per optimizer step);
* ``advantages``: ``advantages.normalize_advantages`` (once per optimizer step, shown for completeness);
* ``megatron``: everything else in the step: the model's own TP collectives, the schedule and
  ``finalize_model_grads`` (DDP gradient all-reduce), identical with Megatron's plain loss.

For each layout (dp2: data parallel; tp2: tensor parallel; cp2: context parallel; ``+flag``: with
``calculate_per_token_loss=True``, the loss returning Megatron's 3-tuple) and each number of micro-batches
M = 1, 2, 4, 8
(the mini-batch is fixed, so the micro-batch size shrinks as M grows) it prints the counts per optimizer
step, split by group. ``plain`` is the same step with Megatron's plain token-mean loss (see
bench_step_overhead.py), for comparison of the ``megatron`` column.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_collectives.py [--json collectives.json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import re
import sys
from typing import Optional

import torch
import torch.distributed as torch_dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rl_agg.mcore import compat  # noqa: E402
from megatron_rl_agg.audit.batch import make_batch  # noqa: E402
from megatron_rl_agg.core.config import LossConfig  # noqa: E402
from megatron_rl_agg.mcore.build import build_model  # noqa: E402
from megatron_rl_agg.mcore.spec import GPTSpec  # noqa: E402
from megatron_rl_agg.mcore.weights import init_weights  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "barrier", "batch_isend_irecv", "send", "recv", "isend", "irecv")

CONFIGS = {
    # The Megatron defaults of the plugin: policy term exact, KL as a per-micro-batch mean.
    "token_mean": dict(loss_aggregation="token_mean", kl_coef=0.01),
    # Two distinct exact modes in one step: prompt_mean (+2 all-gathers) and token_mean for KL/entropy.
    "prompt_mean+kl/H token_mean": dict(loss_aggregation="prompt_mean", kl_coef=0.01,
                                        kl_aggregation="token_mean", entropy_coef=0.001,
                                        entropy_aggregation="token_mean"),
}


class CollectiveCounter:
    """Wraps ``torch.distributed`` collectives; counts ``(context, group label)`` per call."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.context = "megatron"
        self.groups: dict[int, str] = {}

    def install(self) -> None:
        for name in COLLECTIVES:
            original = getattr(torch_dist, name, None)
            if original is not None:
                setattr(torch_dist, name, self._wrap(original))

    def _wrap(self, original):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            if group is None:
                group = next((a for a in args if isinstance(a, torch_dist.ProcessGroup)), None)
            self.counts[(self.context, self._label(group))] += 1
            return original(*args, **kwargs)
        return counted

    def _label(self, group) -> str:
        size = torch_dist.get_world_size(group)
        return f"{self.groups.get(id(group), 'world' if group is None else 'other')}{size}"

    @contextlib.contextmanager
    def within(self, context: str):
        outer, self.context = self.context, context
        try:
            yield
        finally:
            self.context = outer


def plain_forward_step(data_iterator, model):
    """Megatron-LM pretrain_gpt style: cross entropy inside the output layer, micro-batch token mean."""
    mb = next(data_iterator)
    output = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])

    def loss_func(output_tensor):
        mask = mb["loss_mask"].float()
        total = (output_tensor.float() * mask).sum()
        return total, mask.sum().to(torch.int), {"lm loss": torch.stack([total.detach(), mask.sum()])}

    return output, loss_func


def one_step(counter, chunks, batch, cfg, mbs, variant, seq_length, flag=False):
    """One optimizer step's forward-backward (and metric reduction); returns counts per (context, group)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rl_agg.parallel.advantages import normalize_advantages
    from megatron_rl_agg.mcore.loss import forward_step
    from megatron_rl_agg.mcore.batch import prepare_microbatches
    from megatron_rl_agg.parallel.metrics import reduce_metrics

    from megatron_rl_agg.core.context_parallel import split_for_cp_rank

    dp_group = parallel_state.get_data_parallel_group()
    cp_size = parallel_state.get_context_parallel_world_size()
    cp_group = parallel_state.get_context_parallel_group() if cp_size > 1 else None
    for chunk in chunks:
        chunk.zero_grad_buffer()
    counter.counts.clear()
    if variant == "plugin":
        with counter.within("advantages"):
            normalize_advantages(batch["rewards"], group_ids=batch["group_ids"], process_group=dp_group)
        with counter.within("prepare"):
            micro_batches = prepare_microbatches(batch, cfg, mbs, dp_group=dp_group, cp_group=cp_group,
                                                 calculate_per_token_loss=flag)
        fn = forward_step
    else:
        positions = torch.arange(seq_length).expand(mbs, -1)
        micro_batches = [{"tokens": batch["tokens"][k:k + mbs], "labels": batch["labels"][k:k + mbs],
                          "loss_mask": batch["loss_mask"][k:k + mbs], "position_ids": positions}
                         for k in range(0, batch["tokens"].shape[0], mbs)]
        cp_rank = parallel_state.get_context_parallel_rank()
        micro_batches = [{k: split_for_cp_rank(v, cp_size, cp_rank) for k, v in mb.items()}
                         for mb in micro_batches]
        fn = plain_forward_step
    reports = get_forward_backward_func()(
        forward_step_func=fn, data_iterator=iter(micro_batches), model=chunks,
        num_microbatches=len(micro_batches), seq_length=seq_length, micro_batch_size=mbs, forward_only=False)
    if variant == "plugin":
        with counter.within("metrics"):
            reduce_metrics(reports, parallel_state.get_data_parallel_group(with_context_parallel=True))
    return dict(counter.counts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16, help="rows of the mini-batch (all DP ranks)")
    p.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)

    from megatron.core import parallel_state

    from megatron_rl_agg.mcore import loss as megatron_loss

    rank, world = compat.initialize_distributed()
    if world != 2:
        raise SystemExit(f"run under torchrun with 2 processes (got world size {world})")
    counter = CollectiveCounter()
    counter.install()
    # Attribute the loss function's collectives: make_loss_func binds megatron_loss.loss_func at call time.
    original_loss_func = megatron_loss.loss_func

    def counted_loss_func(*a, **kw):
        with counter.within("loss"):
            return original_loss_func(*a, **kw)
    megatron_loss.loss_func = counted_loss_func

    seq = 32
    spec = GPTSpec(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, max_seq_length=seq)
    full = make_batch(batch_size=args.rows, seq_length=seq, vocab_size=128, seed=1)
    full["rewards"] = torch.randn(args.rows, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    full["old_logprobs"] = torch.full((args.rows, seq), -4.0)
    full["ref_logprobs"] = torch.full((args.rows, seq), -4.2)
    full.pop("group_sizes")
    rows_out = []
    for layout, tp, cp, flag in (("dp2", 1, 1, False), ("tp2", 2, 1, False), ("cp2", 1, 2, False),
                                 ("dp2+flag", 1, 1, True), ("cp2+flag", 1, 2, True)):
        compat.initialize_model_parallel(tp, 1, cp=cp, seed=1)
        counter.groups = {id(parallel_state.get_data_parallel_group(with_context_parallel=True)): "dpcp",
                          id(parallel_state.get_context_parallel_group()): "cp",
                          id(parallel_state.get_data_parallel_group()): "dp",
                          id(parallel_state.get_tensor_model_parallel_group()): "tp"}
        chunks = build_model(spec, calculate_per_token_loss=flag)
        init_weights(chunks, seed=1)
        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        local_rows = args.rows // dp
        batch = {k: v[dp_rank * local_rows:(dp_rank + 1) * local_rows] for k, v in full.items()}
        for m in args.microbatches:
            mbs = local_rows // m
            counts = {"plain": one_step(counter, chunks, batch, None, mbs, "plain", seq, flag)}
            for name, kw in CONFIGS.items():
                cfg = LossConfig(max_response_length=seq, **kw)
                counts[name] = one_step(counter, chunks, batch, cfg, mbs, "plugin", seq, flag)
            for name, c in counts.items():
                rows_out.append({"layout": layout, "M": m, "config": name,
                                 "counts": {f"{ctx}/{grp}": n for (ctx, grp), n in sorted(c.items())}})
        del chunks
    compat.destroy_model_parallel()

    if rank == 0:
        print_table(rows_out)
        if args.json_path:
            with open(args.json_path, "w", encoding="utf-8") as fh:
                json.dump(rows_out, fh, indent=1)
    torch_dist.barrier()


def _count(counts: dict, context: Optional[str] = None, kind: Optional[str] = None) -> int:
    """Calls on groups of more than one process (a group of one moves no data), filtered by context/kind."""
    total = 0
    for key, n in counts.items():
        ctx, group = key.split("/")
        match = re.fullmatch(r"([a-z]+)(\d+)", group)
        if int(match.group(2)) > 1 and context in (None, ctx) and kind in (None, match.group(1)):
            total += n
    return total


def print_table(rows: list) -> None:
    """Per optimizer step, on groups of more than one process (groups of one move no data)."""
    plain = {(r["layout"], r["M"]): r["counts"] for r in rows if r["config"] == "plain"}
    print("collectives per optimizer step, rank 0, groups of more than one process only")
    head = (f"{'layout':<8} {'M':>2} {'config':<28} {'prepare':>7} {'metrics':>7} {'advant':>6} "
            f"{'loss DP/mb':>10} {'loss TP/mb':>10} {'CP/mb':>6} {'step total':>10} {'plain total':>11} "
            f"{'added':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["config"] == "plain":
            continue
        c, m = r["counts"], r["M"]
        total, base = _count(c), _count(plain[(r["layout"], m)])
        loss_dp = (_count(c, "loss", "dp") + _count(c, "loss", "dpcp")) / m
        loss_tp, cp_mb = _count(c, "loss", "tp") / m, _count(c, None, "cp") / m
        print(f"{r['layout']:<8} {m:>2} {r['config']:<28} {_count(c, 'prepare'):>7} "
              f"{_count(c, 'metrics'):>7} "
              f"{_count(c, 'advantages'):>6} {loss_dp:>10.2f} {loss_tp:>10.2f} {cp_mb:>6.2f} "
              f"{total:>10} {base:>11} {total - base:>5}")


if __name__ == "__main__":
    try:
        main()
    finally:
        compat.destroy_distributed()
