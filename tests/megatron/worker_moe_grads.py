"""torchrun worker: the plugin's RL loss on a real Megatron MoE GPT at expert-parallel layouts.

    python -m torch.distributed.run --standalone --nproc_per_node 1 \
        tests/megatron/worker_moe_grads.py OUT_DIR dp1+m4:alltoall dp1+m4:allgather aux-parts
    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/megatron/worker_moe_grads.py OUT_DIR ep2+m2:alltoall ep2+m2:allgather
    python -m torch.distributed.run --standalone --nproc_per_node 4 \
        tests/megatron/worker_moe_grads.py OUT_DIR dp2+ep2:alltoall tp2+ep2+m2:allgather ...

The model: 2 layers, every MLP a Megatron ``MoELayer`` (4 gated experts, top-2 softmax routing,
dropless, the ``aux_loss`` load-balancing loss on with coefficient ``AUX_COEFF``), tied embeddings,
fp32, the local spec (``SequentialMLP`` experts) through the CPU mode's MoE redirects.

An item ``<layout>:<dispatcher>`` (layout as ``megatron_rl_agg.parallel.layout.parse_layout``: ``ep``
multiplies the process count, Megatron's data-parallel size is ``dp * ep``) builds the model at that layout with
that token dispatcher and, for each loss configuration, prepares this rank's share of the SAME global
mini-batch (``worker_loss_invariance.make_batch``: unequal rows, a masked row, prompt groups split
across ranks) with micro-batches of ``MBS`` rows, runs one forward-backward with the plugin's
``forward_step`` through ``get_forward_backward_func()`` and gathers the full gradient (expert weights
from their EP ranks). Every layout splits the 8 rows into the same four micro-batches (rows 0-1, 2-3,
4-5, 6-7), spread over ``M`` micro-batches per rank and ``D = dp * ep`` ranks with ``M * D = 4``:
the aux loss is a per-micro-batch statistic, so only the same partition gives the same aux gradient.

A ``:flag`` suffix runs the same with ``calculate_per_token_loss=True`` (the plugin's 3-tuple, whose
``num_tokens`` is the micro-batch's routed-token count); ``:flagraw`` measures Megatron's own aux-loss
scaling under the flag with a zero main loss (the combination the plugin refuses at TP > 1).

The configurations: the six exact aggregation modes (PPO clip with dual clip) plus ``aux_only``
(advantages 0, no KL or entropy: the only gradient is the aux loss's). The item ``aux-parts``
(one process) runs each of the four micro-batches alone (M = D = 1, where Megatron scales the aux
loss by 1) with ``aux_only``: their mean is the aux gradient Megatron's averaging defines.

Rank 0 saves ``{"grads", "aux_loss"}`` per ``(item, config)`` with ``torchrun_utils.save_result``.
"""

from __future__ import annotations

import pathlib
import sys
import time
from functools import partial

import torch
import torch.distributed as torch_dist

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import worker_loss_invariance as base  # noqa: E402
from torchrun_utils import save_result  # noqa: E402

from megatron_rl_agg.mcore import compat  # noqa: E402
from megatron_rl_agg.mcore.build import build_model  # noqa: E402
from megatron_rl_agg.mcore.spec import GPTSpec  # noqa: E402
from megatron_rl_agg.mcore.weights import init_weights  # noqa: E402
from megatron_rl_agg.parallel.layout import parse_layout  # noqa: E402

SEED = 2468
AUX_COEFF = 0.1
MBS = 2
TOTAL_MICROBATCHES = 4
EXPERTS = 4


def moe_spec(dispatcher: str) -> GPTSpec:
    return GPTSpec(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=base.SPEC.vocab_size,
                   max_seq_length=base.SEQ, ffn_hidden_size=32, swiglu=True, add_bias_linear=False,
                   tie_embeddings=True, num_experts=EXPERTS, moe_router_topk=2,
                   moe_token_dispatcher_type=dispatcher, moe_aux_loss_coeff=AUX_COEFF)


CONFIGS = {mode: base.CONFIGS[mode] for mode in base.MODES if mode != "token_mean_legacy"}
CONFIGS["aux_only"] = base.LossConfig(**base.PG)


def batch_for(config: str) -> dict:
    batch = base.make_batch(base.ROW_TOKENS, seed=SEED)
    if config == "aux_only":
        batch["advantages"] = torch.zeros_like(batch["advantages"])
    return batch


def aux_loss_total() -> float:
    """Sum over layers of the load-balancing losses Megatron tracked in this step (unscaled by the
    coefficient, summed over micro-batches and over the tracker's reduce group), then cleared."""
    values = compat.moe_metric_per_layer("load_balancing_loss")
    if values is None:
        raise RuntimeError("no MoE load-balancing loss was tracked in this step (expected one per layer)")
    return float(values.sum())


def run_config(chunks, batch, cfg, mbs, flag=False):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rl_agg.mcore.loss import forward_step
    from megatron_rl_agg.mcore.batch import prepare_microbatches
    from megatron_rl_agg.mcore.weights import gather_full_grads

    dp_group = parallel_state.get_data_parallel_group()
    share = base.rank_share(batch, parallel_state.get_data_parallel_rank(), torch_dist.get_world_size(dp_group))
    micro_batches = prepare_microbatches(share, cfg, mbs, dp_group=dp_group, calculate_per_token_loss=flag)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=chunks,
        num_microbatches=len(micro_batches), seq_length=base.SEQ, micro_batch_size=mbs, forward_only=False)
    aux = aux_loss_total()
    return gather_full_grads(chunks), aux


def aux_only_loss_func(num_tokens, output_tensor):
    """Megatron's 3-tuple under ``calculate_per_token_loss``: a zero main loss (only the aux loss has a
    gradient) and this micro-batch's ROUTED token count ``b * s`` (padding included), the count the
    router scales the aux loss by."""
    return (output_tensor * 0.0).sum(), num_tokens, {}


def aux_only_forward_step(data_iterator, model):
    mb = next(data_iterator)
    output = model(mb["tokens"], mb["position_ids"], None)
    routed = torch.tensor(mb["tokens"].numel(), dtype=torch.int64)
    return output, partial(aux_only_loss_func, routed)


def run_aux_only_flag(chunks, mbs):
    """The aux-only gradient with ``calculate_per_token_loss=True`` (Megatron's contract: DDP sums,
    ``finalize_model_grads`` divides by the total routed tokens N over DP and micro-batches)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rl_agg.mcore.weights import gather_full_grads

    dp_group = parallel_state.get_data_parallel_group()
    share = base.rank_share(batch_for("aux_only"), parallel_state.get_data_parallel_rank(),
                            torch_dist.get_world_size(dp_group))
    rows = share["tokens"].shape[0]
    micro_batches = [{k: v[i:i + mbs] for k, v in share.items()} for i in range(0, rows, mbs)]
    for chunk in chunks:
        chunk.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=aux_only_forward_step, data_iterator=iter(micro_batches), model=chunks,
        num_microbatches=len(micro_batches), seq_length=base.SEQ, micro_batch_size=mbs, forward_only=False)
    aux = aux_loss_total()
    return gather_full_grads(chunks), aux


def build(layout, dispatcher, **config_overrides):
    compat.initialize_model_parallel(layout.tp, layout.pp, layout.vpp, seed=SEED, ep=layout.ep)
    chunks = build_model(moe_spec(dispatcher), **config_overrides)
    init_weights(chunks, seed=SEED)
    return chunks


def run_item(out_dir: str, item: str) -> None:
    layout_text, _, variant = item.partition(":")
    dispatcher, _, flag = variant.partition(":")
    if flag not in ("", "flag", "flagraw"):
        raise ValueError(f"unknown suffix {flag!r} in {item!r}; valid: '', 'flag', 'flagraw'")
    layout = parse_layout(layout_text)
    world = torch_dist.get_world_size()
    if layout.world_size != world:
        raise ValueError(f"{item}: layout needs {layout.world_size} processes, got {world}")
    if layout.num_microbatches * layout.data_parallel_size != TOTAL_MICROBATCHES:
        raise ValueError(f"{item}: M * D must be {TOTAL_MICROBATCHES} (the same four micro-batches)")
    if flag == "flagraw":
        # Megatron's own aux scaling under the flag, measured with a zero main loss (the plugin's loss
        # refuses this combination at TP > 1: check_moe_setup's message is saved with the gradient).
        from megatron.core.utils import get_model_config

        from megatron_rl_agg.mcore.setup_checks import check_moe_setup

        chunks = build(layout, dispatcher, calculate_per_token_loss=True)
        try:
            check_moe_setup(get_model_config(chunks[0]))
            refusal = None
        except ValueError as err:
            refusal = str(err)
        grads, aux = run_aux_only_flag(chunks, MBS)
        if torch_dist.get_rank() == 0:
            save_result(out_dir, f"{item}-aux_only", {"grads": grads, "aux_loss": aux, "refusal": refusal})
        compat.destroy_model_parallel()
        return
    chunks = build(layout, dispatcher, calculate_per_token_loss=bool(flag))
    for name, cfg in CONFIGS.items():
        grads, aux = run_config(chunks, batch_for(name), cfg, MBS, flag=bool(flag))
        if torch_dist.get_rank() == 0:
            save_result(out_dir, f"{item}-{name}", {"grads": grads, "aux_loss": aux})
    compat.destroy_model_parallel()


def run_aux_parts(out_dir: str) -> None:
    """Each micro-batch alone (M = D = 1) with the aux-only loss; saves the mean gradient."""
    if torch_dist.get_world_size() != 1:
        raise ValueError("aux-parts runs in one process")
    chunks = build(parse_layout("dp1+m1"), "alltoall")
    batch = batch_for("aux_only")
    parts, aux = [], []
    for k in range(TOTAL_MICROBATCHES):
        rows = {key: v[k * MBS:(k + 1) * MBS] for key, v in batch.items()}
        grads, loss = run_config(chunks, rows, CONFIGS["aux_only"], MBS)
        parts.append(grads)
        aux.append(loss)
    mean = {key: sum(p[key] for p in parts) / TOTAL_MICROBATCHES for key in parts[0]}
    save_result(out_dir, "aux-parts", {"grads": mean, "aux_loss": sum(aux)})
    compat.destroy_model_parallel()


PAD_SEQ = 7          # real columns of the padding item's rows (SEQ - PAD_SEQ padding columns appended)


def padding_batches():
    """The padding item's batches: ``ref`` = rows 0-1 of the aux-only batch cut to ``PAD_SEQ`` columns, every
    token real; ``padded`` = the same rows with ``SEQ - PAD_SEQ`` padding columns (token 0, ``token_mask``
    0) and one padding row (token_mask all 0); ``empty`` = ``padded`` plus two more padding rows, so that
    with two rows per micro-batch the second micro-batch holds no real token."""
    full = batch_for("aux_only")
    ref = {k: (v[:2, :PAD_SEQ] if v.dim() == 2 else v[:2]).clone() for k, v in full.items() if k != "position_ids"}
    ref["token_mask"] = torch.ones(2, PAD_SEQ)

    def padded_rows(n):
        out = {}
        for k, v in ref.items():
            shape = (n,) + ((base.SEQ,) if v.dim() == 2 else ())
            z = torch.zeros(shape, dtype=v.dtype)
            if v.dim() == 2:
                z[:2, :PAD_SEQ] = v
            else:
                z[:2] = v
            out[k] = z
        return out

    return ref, padded_rows(3), padded_rows(4)


class ExpertCounts:
    """Records the router's real-token counts per expert (``global_tokens_per_expert`` of Megatron's
    ``get_tokens_per_expert_and_token_count``, the ``f_i`` numerator of the aux loss) while active."""

    def __enter__(self):
        from megatron.core.transformer.moe import router

        self.module, self.original, self.counts = router, router.get_tokens_per_expert_and_token_count, []

        def recorded(*args, **kwargs):
            out = self.original(*args, **kwargs)
            self.counts.append(out[0].detach().clone())
            return out

        router.get_tokens_per_expert_and_token_count = recorded
        return self

    def __exit__(self, *exc):
        self.module.get_tokens_per_expert_and_token_count = self.original


def run_padding(out_dir: str) -> None:
    """Padding rows / columns leave the aux loss: the aux-only gradient, per-expert real-token counts and
    tracked aux loss of ``padded`` (3 rows of SEQ in one micro-batch) equal those of ``ref`` (2 rows of
    PAD_SEQ, no padding), with and without ``calculate_per_token_loss``; ``empty`` (a second micro-batch
    of padding rows only) runs without NaN and gives 1/2 of the reference gradient flag off (its aux loss
    is left out, Megatron averages over M = 2), the reference gradient itself flag on (num_tokens 0)."""
    if torch_dist.get_world_size() != 1:
        raise ValueError("padding runs in one process")
    ref, padded, empty = padding_batches()
    results = {}
    for flag in (False, True):
        chunks = build(parse_layout("dp1+m1"), "alltoall", calculate_per_token_loss=flag)
        for name, batch, mbs in (("ref", ref, 2), ("padded", padded, 3), ("empty", empty, 2)):
            with ExpertCounts() as counts:
                grads, aux = run_config(chunks, batch, CONFIGS["aux_only"], mbs, flag=flag)
            results[f"{name}{'-flag' if flag else ''}"] = {"grads": grads, "aux_loss": aux,
                                                          "counts": torch.stack(counts.counts)}
        compat.destroy_model_parallel()
    # moe_grad_scale_func (megatron-core >= 0.19): a scale of 2 doubles the aux-only gradient; None where the
    # release has no such field
    chunks = build(parse_layout("dp1+m1"), "alltoall")
    config = chunks[0].config
    if hasattr(config, "moe_grad_scale_func"):
        from megatron_rl_agg.mcore.build import build_optimizer

        build_optimizer(chunks, 1e-3)                 # sets it to the optimizer's loss scale (1 in fp32)
        results["optimizer_scale"] = float(config.moe_grad_scale_func())
        config.moe_grad_scale_func = lambda: 2.0
        grads, aux = run_config(chunks, ref, CONFIGS["aux_only"], 2)
        results["scale2"] = {"grads": grads, "aux_loss": aux}
    compat.destroy_model_parallel()
    save_result(out_dir, "padding", results)


def run(argv):
    """``argv = [out_dir, *items]`` in a process group that is up (``tests/worker_jobs.py``)."""
    out_dir, items = argv[0], argv[1:]
    for item in items:
        start = time.perf_counter()
        if item == "aux-parts":
            run_aux_parts(out_dir)
        elif item == "padding":
            run_padding(out_dir)
        else:
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
