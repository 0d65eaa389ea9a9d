"""torchrun worker: one forward-backward of a real Megatron GPT at several layouts, full gradients saved.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/megatron/worker_layout_grads.py OUT_DIR dp2+m2 tp2 pp2+m4 pp2+vpp2+m4

Each layout string (see ``megatron_rl_agg.parallel.layout.parse_layout``) must use every process
(tp * pp * cp * dp == world size). A ``:mbmean`` suffix swaps the policy term's aggregation for
``token_mean_legacy`` (Megatron's per-micro-batch token mean), used as a negative control; ``:distopt``
uses Megatron's distributed optimizer with overlapped gradient reduce-scatter; ``:flag`` sets
``calculate_per_token_loss=True`` (Megatron's 3-tuple). Under context parallelism (``cp2``) the local
spec's core attention is the plugin's ``ContextParallelDotProductAttention``. For each item, in order,
the worker

1. (re)initialises Megatron's model-parallel state and builds the chunks (tied embeddings, gated
   MLP, grouped-query attention);
2. initialises the weights layout-independently (``init_weights``);
3. prepares this DP rank's rows with the product's ``mcore.batch.prepare_microbatches`` (global
   weights over the DP group, the zigzag CP shard, the 2- or 3-tuple scale);
4. runs a forward-only pass that checks the logits contract: ``[b, s, vocab / tp]`` on the last
   stage, and a cross entropy from the TP-gathered logits equal to Megatron's vocab-parallel one;
5. runs one training forward-backward through Megatron's schedule with the product's
   ``mcore.loss.forward_step`` (so ``make_loss_func`` / ``loss_func`` scale every term);
6. gathers the full gradients and weights, takes one optimizer step (global-norm clipping on), and
   rank 0 saves ``{"grads", "params", "loss", "grad_norm"}`` as ``OUT_DIR/<index>-<item>.pt``.

The loss: the mini-batch has rows of unequal length (one fully masked); every layout sees the same rows,
advantages (one per row) and loss config: the on-policy PPO surrogate (ratio 1, so its gradient is
``-sum_t w_t A_t grad log p_t``) aggregated ``token_mean`` plus an entropy bonus (``entropy_coef`` 0.01)
aggregated ``token_mean`` too, both over the whole mini-batch. Nothing here scales the loss: the
product's scaling must cancel the schedule's ``/num_microbatches`` (and ``x cp``) and DDP's average
over ``dp x cp`` under the 2-tuple, and ``finalize_model_grads``' division by the routed-token total
under the 3-tuple, for the gradient to be the same at every layout. ``loss`` is the reduced
``loss/sum`` metric: the objective.
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

from megatron_rl_agg.core.config import LossConfig  # noqa: E402
from megatron_rl_agg.mcore import compat  # noqa: E402
from megatron_rl_agg.mcore.batch import prepare_microbatches  # noqa: E402
from megatron_rl_agg.mcore.loss import forward_step  # noqa: E402
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
# one advantage per row, all nonzero (the policy term's gradient is -A grad log p)
ADVANTAGES = torch.linspace(-1.0, 1.5, len(ROW_LENGTHS))


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


def loss_config(variant: str) -> LossConfig:
    """The product's loss: token-mean policy term (``token_mean_legacy`` under ``:mbmean``) plus a
    globally token-mean-aggregated entropy bonus."""
    return LossConfig(loss_aggregation="token_mean_legacy" if variant == "mbmean" else "token_mean",
                      entropy_coef=0.01, entropy_aggregation="token_mean")


def dp_rows(layout, dp_rank):
    """This DP rank's contiguous share of the rows (full rows: every CP rank of it passes the same), as
    the batch dict of ``prepare_microbatches``, and the micro-batch size giving ``num_microbatches``."""
    inputs, labels, mask = make_batch()
    rows = inputs.shape[0] // layout.dp
    mbs = rows // layout.num_microbatches
    if mbs * layout.num_microbatches * layout.dp != inputs.shape[0]:
        raise ValueError(f"{inputs.shape[0]} rows do not split evenly for layout {layout}")
    share = slice(dp_rank * rows, (dp_rank + 1) * rows)
    batch = {"tokens": inputs[share], "labels": labels[share], "loss_mask": mask[share],
             "advantages": ADVANTAGES[share]}
    return batch, mbs


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
    micro_batch = next(data_iterator)
    # logits [b, s, vocab/tp] on the last stage (s: this CP rank's shard, as the labels)
    logits = model(micro_batch["tokens"], micro_batch["position_ids"], None)
    return logits, partial(logits_check_loss_func, micro_batch["labels"])


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

    batch, mbs = dp_rows(layout, parallel_state.get_data_parallel_rank())
    micro_batches = prepare_microbatches(
        batch, loss_config(variant), mbs, dp_group=parallel_state.get_data_parallel_group(),
        cp_group=parallel_state.get_context_parallel_group(), calculate_per_token_loss=flag,
        vocab_size=SPEC.vocab_size)
    if len(micro_batches) != layout.num_microbatches:
        raise AssertionError(f"{len(micro_batches)} micro-batches prepared for layout {layout}")

    fwd_bwd = get_forward_backward_func()

    def run_schedule(step_func, forward_only):
        # Interleaved PP expects one iterator per model chunk; each walks all micro-batches.
        data = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
        return fwd_bwd(forward_step_func=step_func, data_iterator=data, model=chunks,
                       num_microbatches=layout.num_microbatches, seq_length=SEQ_LEN,
                       micro_batch_size=mbs, forward_only=forward_only)

    run_schedule(logits_forward_step, forward_only=True)

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_schedule(forward_step, forward_only=False)
    grads = gather_full_grads(chunks)
    params = gather_full_params(chunks)
    _, grad_norm, _ = optimizer.step()

    # Reported loss: last-stage, TP-rank-0 processes hold their micro-batches' (CP shards') shares of the
    # objective (loss/sum, already divided by M * D under token_mean_legacy); sum them.
    owner = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    local_loss = sum(float(r["loss/sum"]) for r in reports) if owner else 0.0
    losses = [None] * world
    torch_dist.all_gather_object(losses, local_loss)
    loss = sum(losses)
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
