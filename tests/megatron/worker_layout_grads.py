"""torchrun worker: one forward-backward of a real Megatron GPT at several layouts, full gradients saved.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/megatron/worker_layout_grads.py OUT_DIR dp2+m2 tp2 pp2+m4 pp2+vpp2+m4

Each layout string (see ``megatron_rl_agg.parallel.layout.parse_layout``) must use every process
(tp * pp * cp * dp == world size). A ``:mbmean`` suffix swaps the loss for the per-micro-batch token mean
(the legacy objective), used as a negative control; ``:distopt`` uses Megatron's distributed
optimizer with overlapped gradient reduce-scatter; ``:flag`` sets ``calculate_per_token_loss=True`` and
returns Megatron's 3-tuple. Under context parallelism (``cp2``) every CP rank keeps its zigzag shard of
the rows (``context_parallel.split_for_cp_rank``) and the local spec's core attention is the plugin's
``ContextParallelDotProductAttention``. For each item, in order, the worker

1. (re)initialises Megatron's model-parallel state and builds the chunks (tied embeddings, gated
   MLP, grouped-query attention);
2. initialises the weights layout-independently (``init_weights``);
3. runs a forward-only pass that checks the logits contract: ``[b, s, vocab / tp]`` on the last
   stage, and a cross entropy from the TP-gathered logits equal to Megatron's vocab-parallel one;
4. runs one training forward-backward with the global token-mean cross entropy below;
5. gathers the full gradients and weights, takes one optimizer step (global-norm clipping on), and
   rank 0 saves ``{"grads", "params", "loss", "grad_norm"}`` as ``OUT_DIR/<index>-<item>.pt``.

The loss: the mini-batch has rows of unequal length (one fully masked); every layout sees the same
rows. With ``N`` the loss-token count of the whole mini-batch (all-reduced over DP) and
``w = mask / N``, each micro-batch returns ``sum(ce * w) * num_microbatches * dp_size``:
the schedule divides by ``num_microbatches`` (and multiplies by the CP size) and DDP averages over the
``dp_size * cp`` ranks, so the gradient is that of ``sum_all_rows(ce * w)``, the global token mean, at
every layout. Under ``:flag`` each micro-batch returns ``(sum(ce * w) * R, b * s, report)`` with ``R`` the
routed tokens of the whole mini-batch: DDP sums and ``finalize_model_grads`` divides by ``R``.
"""

from __future__ import annotations

import pathlib
import sys
import time
from functools import partial

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from torchrun_utils import save_result  # noqa: E402

from megatron_rl_agg.parallel import dist  # noqa: E402
from megatron_rl_agg.mcore import compat  # noqa: E402
from megatron_rl_agg.core.context_parallel import split_for_cp_rank  # noqa: E402
from megatron_rl_agg.mcore.build import build_model, build_optimizer  # noqa: E402
from megatron_rl_agg.mcore.spec import GPTSpec  # noqa: E402
from megatron_rl_agg.mcore.weights import gather_full_grads, gather_full_params, init_weights  # noqa: E402
from megatron_rl_agg.parallel.layout import parse_layout  # noqa: E402

SEED = 1234
# Gated MLP and grouped-query attention: their fused TP-sharded weights are the hardest to slice.
SPEC = GPTSpec(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=64,
               max_seq_length=16, ffn_hidden_size=64, swiglu=True, tie_embeddings=True)
# Tokens per row including a 2-token prompt; row 3 has no response token, so no loss token.
ROW_LENGTHS = [12, 5, 9, 2, 11, 7, 12, 4]
PROMPT_LEN = 2
SEQ_LEN = 12


def make_batch():
    """The whole mini-batch, identical on every rank: inputs/labels/mask ``[8, 12]``."""
    gen = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(1, SPEC.vocab_size, (len(ROW_LENGTHS), SEQ_LEN + 1), generator=gen)
    positions = torch.arange(SEQ_LEN + 1)
    lengths = torch.tensor(ROW_LENGTHS)[:, None]
    tokens[positions[None, :] >= lengths] = 0  # right padding
    labels = tokens[:, 1:]
    # position t predicts token t+1; loss on response tokens only (indices PROMPT_LEN..len-1).
    t = torch.arange(SEQ_LEN)[None, :]
    mask = ((t >= PROMPT_LEN - 1) & (t < lengths - 1)).float()
    return tokens[:, :-1].contiguous(), labels.contiguous(), mask


def microbatches(inputs, labels, weights, layout, dp_rank):
    """This DP rank's contiguous share of rows, cut into ``num_microbatches`` equal micro-batches."""
    rows = inputs.shape[0] // layout.dp
    mbs = rows // layout.num_microbatches
    if mbs * layout.num_microbatches * layout.dp != inputs.shape[0]:
        raise ValueError(f"{inputs.shape[0]} rows do not split evenly for layout {layout}")
    start = dp_rank * rows
    return [
        (inputs[s:s + mbs], labels[s:s + mbs], weights[s:s + mbs])
        for s in range(start, start + rows, mbs)
    ], mbs


def ce_loss_func(weights, scale, num_tokens, per_token_ce):
    """2-tuple loss contract ``(sum(ce * w) * scale, report)``, or with ``num_tokens`` (an int32 tensor)
    the 3-tuple ``(sum(ce * w) * scale, num_tokens, report)``; the report keeps the unscaled sum."""
    weighted = (per_token_ce.float() * weights).sum()
    report = {"weighted_ce_sum": weighted.detach()}
    if num_tokens is not None:
        return weighted * scale, num_tokens, report
    return weighted * scale, report


def ce_forward_step(data_iterator, model):
    tokens, labels, weights, scale, positions, num_tokens = next(data_iterator)
    # With labels, GPTModel returns Megatron's vocab-parallel per-token cross entropy [b, s].
    output = model(tokens, positions, None, labels=labels)
    return output, partial(ce_loss_func, weights, scale, num_tokens)


def logits_check_loss_func(labels, logits):
    """Forward-only check of the logits contract on the last stage; returns a zero loss."""
    from megatron.core import parallel_state, tensor_parallel

    tp = parallel_state.get_tensor_model_parallel_world_size()
    expected = (labels.shape[0], labels.shape[1], SPEC.vocab_size // tp)
    if tuple(logits.shape) != expected:
        raise AssertionError(f"logits shape {tuple(logits.shape)}, expected [b, s, vocab/tp] = {expected}")
    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits.float())
    ce_full = F.cross_entropy(full.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    # vocab_parallel_cross_entropy takes [s, b, v/tp] logits and [s, b] targets.
    ce_tp = tensor_parallel.vocab_parallel_cross_entropy(
        logits.float().transpose(0, 1).contiguous(), labels.t().contiguous()).t()
    diff = (ce_full - ce_tp).abs().max().item()
    if diff > 1e-5:
        raise AssertionError(f"TP-gathered cross entropy differs from the vocab-parallel one by {diff}")
    return torch.zeros(()), {"logits_ce_max_diff": torch.tensor(diff)}


def logits_forward_step(data_iterator, model):
    tokens, labels, _, _, positions, _ = next(data_iterator)
    logits = model(tokens, positions, None)  # no labels: logits [b, s, vocab/tp] on the last stage
    return logits, partial(logits_check_loss_func, labels)


def run_item(item: str, index: int, out_dir: str) -> str:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    layout_text, _, variant = item.partition(":")
    if variant not in ("", "mbmean", "distopt", "flag"):
        raise ValueError(f"unknown variant {variant!r} in {item!r}; valid: '', 'mbmean', 'distopt', 'flag'")
    layout = parse_layout(layout_text)
    world = torch_dist.get_world_size()
    if layout.world_size != world:
        raise ValueError(f"layout {layout_text!r} needs {layout.world_size} processes, got {world}")
    compat.initialize_model_parallel(layout.tp, layout.pp, layout.vpp, cp=layout.cp, seed=SEED)
    distopt, flag = variant == "distopt", variant == "flag"
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distopt,
                                               overlap_grad_reduce=distopt)
    chunks = build_model(SPEC, ddp_config=ddp_config, calculate_per_token_loss=flag)
    init_weights(chunks, seed=SEED)
    optimizer = build_optimizer(chunks, lr=1e-3, clip_grad=0.05, use_distributed_optimizer=distopt)

    dp_group = parallel_state.get_data_parallel_group()
    dp_rank = parallel_state.get_data_parallel_rank()
    inputs, labels, mask = make_batch()
    mbs_rows, mbs = microbatches(inputs, labels, mask, layout, dp_rank)
    if variant == "mbmean":
        # Legacy objective: each micro-batch's own token mean, averaged over micro-batches and DP.
        batches = [(x, y, m / m.sum().clamp(min=1), 1.0) for x, y, m in mbs_rows]
    else:
        local_tokens = sum(m.sum() for _, _, m in mbs_rows)
        n_tokens = dist.all_reduce_sum(local_tokens, dp_group)
        # schedule divides by num_microbatches, DDP averages over dp ranks: undo both.
        scale = float(layout.num_microbatches * layout.dp)
        batches = [(x, y, m / n_tokens.clamp(min=1), scale) for x, y, m in mbs_rows]
    num_tokens = None
    if flag:   # 3-tuple: n = the shard's routed tokens; Megatron divides the summed gradient by their total
        num_tokens = torch.tensor(mbs * SEQ_LEN // layout.cp, dtype=torch.int32)
        routed = float(inputs.shape[0] * SEQ_LEN)
        batches = [(x, y, w, routed) for x, y, w, _ in batches]
    cp_rank = parallel_state.get_context_parallel_rank()
    positions = torch.arange(SEQ_LEN).expand(mbs, SEQ_LEN)
    batches = [tuple(split_for_cp_rank(t, layout.cp, cp_rank) for t in (x, y, w)) + (scale,)
               + (split_for_cp_rank(positions, layout.cp, cp_rank), num_tokens)
               for x, y, w, scale in batches]

    fwd_bwd = get_forward_backward_func()

    def run_schedule(step_func, forward_only):
        # Interleaved PP expects one iterator per model chunk; each walks all micro-batches.
        data = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
        return fwd_bwd(forward_step_func=step_func, data_iterator=data, model=chunks,
                       num_microbatches=layout.num_microbatches, seq_length=SEQ_LEN,
                       micro_batch_size=mbs, forward_only=forward_only)

    run_schedule(logits_forward_step, forward_only=True)

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_schedule(ce_forward_step, forward_only=False)
    grads = gather_full_grads(chunks)
    params = gather_full_params(chunks)
    _, grad_norm, _ = optimizer.step()

    # Reported loss: last-stage, TP-rank-0 processes hold their micro-batches' sums; sum them.
    owner = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    local_loss = sum(float(r["weighted_ce_sum"]) for r in reports) if owner else 0.0
    losses = [None] * world
    torch_dist.all_gather_object(losses, local_loss)
    loss = sum(losses) / (layout.num_microbatches * layout.dp) if variant == "mbmean" else sum(losses)
    if torch_dist.get_rank() == 0:
        save_result(out_dir, f"{index:02d}-{item}",
                    {"grads": grads, "params": params, "loss": loss, "grad_norm": float(grad_norm)})
    compat.destroy_model_parallel()
    return f"{item}: loss {loss:.6f} grad_norm {float(grad_norm):.6f}"


def run(argv):
    """``argv = [out_dir, *items]`` in a process group that is up (``tests/worker_jobs.py``)."""
    out_dir, items = argv[0], argv[1:]
    for index, item in enumerate(items):
        start = time.perf_counter()
        line = run_item(item, index, out_dir)
        if torch_dist.get_rank() == 0:
            print(f"{line} ({time.perf_counter() - start:.2f} s)", flush=True)


def main(argv):
    compat.initialize_distributed()
    run(argv)
    torch_dist.barrier()
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
