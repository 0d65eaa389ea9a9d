"""torchrun worker: packed (THD) vs padded micro-batches through a real Megatron GPT and the real loss.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/megatron/worker_packing.py OUT_DIR tp2 pp2:abs

Each item is a layout (``megatron_rl_agg.parallel.layout.parse_layout``, dp1, using every process) with an
optional suffix: ``:abs`` for learned absolute position embeddings (default RoPE), ``:fixed`` to pad
every pack of the step to one length (``pack_microbatches(equal_length=True)``) instead of letting
pipeline stages exchange shapes (``variable_seq_lengths``, used by PP items otherwise); the
interleaved (VPP) schedule needs ``:fixed``. For each item the worker
builds the model once with ``packed_local_layer_spec`` (whose attention runs Megatron's own code for
padded input and the block-diagonal THD path for packed input), initialises the weights
layout-independently, and for each aggregation mode in ``MODES`` runs one forward-backward with

- padded: ``megatron_loss.prepare_microbatches`` + ``megatron_loss.forward_step``;
- packed: the same micro-batches through ``packing.pack_microbatches`` + ``packing.packed_forward_step``.

Both use the unchanged ``megatron_loss.loss_func`` (PPO surrogate, k3 KL to a reference, entropy
bonus). The rank on the last pipeline stage with TP rank 0 saves, per item and mode, the full
gradients of both runs (``gather_full_grads``), the reported objective and its terms (totals of
``loss/sum``, ``policy_loss/sum``, ``kl_loss/sum``, ``entropy_loss/sum``) and
the per-token log-probs of the labels (packed ones scattered back to ``[B, S]`` and a bool ``kept``
mask of the positions packing keeps), as ``OUT_DIR/<index>-<item>.pt``. For the first mode it also
runs a negative control (``grads_control``): the packs with a single ``cu_seqlens`` segment.
"""

from __future__ import annotations

import pathlib
import sys
import time

import torch
import torch.distributed as torch_dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from torchrun_utils import save_result  # noqa: E402

from megatron_rl_agg.mcore import compat  # noqa: E402
from megatron_rl_agg.core.config import LossConfig  # noqa: E402
from megatron_rl_agg.mcore.loss import forward_step  # noqa: E402
from megatron_rl_agg.mcore.batch import prepare_microbatches
from megatron_rl_agg.mcore.logprobs import vocab_parallel_logprobs  # noqa: E402
from megatron_rl_agg.mcore.build import build_model  # noqa: E402
from megatron_rl_agg.mcore.spec import GPTSpec  # noqa: E402
from megatron_rl_agg.mcore.weights import gather_full_grads, init_weights  # noqa: E402
from megatron_rl_agg.parallel.layout import parse_layout  # noqa: E402
from megatron_rl_agg.mcore.packing import pack_microbatches, packed_forward_step  # noqa: E402
from megatron_rl_agg.mcore.packed_attention import packed_local_layer_spec  # noqa: E402
from megatron_rl_agg.mcore.packing import unpack  # noqa: E402

SEED = 4321
MODES = ("token_mean", "seq_mean_token_mean", "gspo.seq_mean_token_mean", "token_mean+is",
         "gspo.seq_mean_token_mean+is")
"""Aggregation modes with the PPO clipped surrogate, and ``loss.mode``: GSPO (per-sequence ratio from the
segment sums of each pack, clip bounds that clip some sequences) in the paper's per-sequence mean. ``+is``:
with the off-policy correction (behaviour log-probs off the proximal ones, :data:`IS_SETTINGS`)."""
# The correction of a ``+is`` mode, by policy loss: token-level weights clipped to [0.8, 1.2] for the PPO
# surrogate, sequence-level weights (product over the full row) masked outside [0.5, 2] for GSPO; both
# self-normalized over the mini-batch.
IS_SETTINGS = {"": dict(is_level="token", is_mode="clip", is_low=0.8, is_high=1.2, is_self_normalize=True),
               "gspo": dict(is_level="sequence", is_mode="mask", is_low=0.5, is_high=2.0, is_self_normalize=True)}


def loss_config(name: str) -> LossConfig:
    name, _, corrected = name.partition("+")
    loss, _, mode = name.rpartition(".")
    extra = dict(policy_loss=loss, clip_eps_low=0.05, clip_eps_high=0.05) if loss else {}
    if corrected:
        extra.update(IS_SETTINGS[loss])
    return LossConfig(loss_aggregation=mode, kl_coef=0.05, entropy_coef=0.01, **extra)
SEQ_LEN = 16
# Real tokens per row (prompt 3 + response); row 5 has no response (fully masked), rows differ in
# length so that packing moves every row but the first.
ROW_LENGTHS = [16, 5, 11, 7, 13, 3, 9, 16]
PROMPT_LEN = 3
MICRO_BATCH_SIZE = 4  # -> 2 micro-batches


def make_spec(position_embedding_type: str, variable_seq_lengths: bool) -> GPTSpec:
    # GQA (4 heads, 2 groups) exercises the kv-head repeat of the packed attention, also at TP2.
    return GPTSpec(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                   vocab_size=64, max_seq_length=SEQ_LEN, ffn_hidden_size=64,
                   position_embedding_type=position_embedding_type,
                   variable_seq_lengths=variable_seq_lengths)


def make_batch() -> dict:
    """The whole mini-batch, identical on every rank (rows ``[8, 16]``, 4 prompt groups of 2)."""
    gen = torch.Generator().manual_seed(SEED)
    n = len(ROW_LENGTHS)
    cols = torch.arange(SEQ_LEN).unsqueeze(0)
    lengths = torch.tensor(ROW_LENGTHS).unsqueeze(1)
    real = cols < lengths
    full = torch.randint(1, 64, (n, SEQ_LEN + 1), generator=gen)
    tokens = full[:, :-1] * real
    labels = full[:, 1:] * real
    # position t predicts token t+1: response tokens are the labels at PROMPT_LEN-1 .. len-2
    loss_mask = ((cols >= PROMPT_LEN - 1) & (cols < lengths - 1)).float()
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "advantages": torch.randn(n, generator=gen, dtype=torch.float64),
        # behaviour log-probs near the current ones (ratio near 1, some tokens clipped)
        "old_logprobs": (-4.2 + 0.3 * torch.randn(n, SEQ_LEN, generator=gen)) * loss_mask,
        "ref_logprobs": (-4.2 + 0.3 * torch.randn(n, SEQ_LEN, generator=gen)) * loss_mask,
        "group_ids": torch.arange(n) // 2,
        # the sampling engine's (the +is modes only): drawn like the old ones, so the token log-ratio
        # logp_prox - logp_behave is 0.3 x sqrt(2) x N(0, 1): some weights clipped / rows masked, others not
        "behaviour_logprobs": (-4.2 + 0.3 * torch.randn(n, SEQ_LEN, generator=gen)) * loss_mask,
    }


def single_segment(params):
    """``params`` with the whole pack as one causal segment (no block-diagonal mask)."""
    import dataclasses

    total = int(params.cu_seqlens_q[-1])
    cu = torch.tensor([0, total], dtype=torch.int32)
    return dataclasses.replace(params, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=total,
                               max_seqlen_kv=total)


def capture_logprobs(step, store: list):
    """Wrap a forward step so the loss function also records ``log p(label)`` as ``[b, S]``."""

    def wrapped_step(data_iterator, model):
        output, loss_fn = step(data_iterator, model)
        micro_batch = loss_fn.keywords["micro_batch"]

        def recording_loss(output_tensor):
            with torch.no_grad():  # vocab_parallel_logprobs rewrites its input: pass a copy
                logp = vocab_parallel_logprobs(output_tensor.detach().clone(), micro_batch["labels"])
            layout = micro_batch.get("packed_layout")
            store.append(logp if layout is None else unpack(logp, layout))
            return loss_fn(output_tensor)

        return output, recording_loss

    return wrapped_step


TERMS = ("loss/sum", "policy_loss/sum", "kl_loss/sum", "entropy_loss/sum")


def run_once(chunks, micro_batches, step) -> tuple[dict, dict, torch.Tensor]:
    """One forward-backward; returns (full grads, reported totals of ``TERMS``, log-probs [B, S])."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.zero_grad_buffer()
    logps: list = []
    # The interleaved (VPP) schedule wants one iterator per model chunk, each over all micro-batches.
    data = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    reports = get_forward_backward_func()(
        forward_step_func=capture_logprobs(step, logps), data_iterator=data,
        model=chunks, num_microbatches=len(micro_batches),
        seq_length=micro_batches[0]["tokens"].shape[1], micro_batch_size=micro_batches[0]["tokens"].shape[0],
        forward_only=False)
    totals = {term: sum(float(r[term]) for r in reports) for term in TERMS} if reports else {}
    logp = torch.cat(logps) if logps else torch.empty(0)
    return gather_full_grads(chunks), totals, logp


def run_item(item: str, index: int, out_dir: str) -> str:
    from megatron.core import parallel_state

    layout_text, _, variant = item.partition(":")
    if variant not in ("", "abs", "fixed"):
        raise ValueError(f"unknown variant {variant!r} in {item!r}; valid: '', 'abs', 'fixed'")
    layout = parse_layout(layout_text)
    if layout.world_size != torch_dist.get_world_size() or layout.dp != 1:
        raise ValueError(f"layout {layout_text!r} must be dp1 and use all {torch_dist.get_world_size()} "
                         "processes")
    compat.initialize_model_parallel(layout.tp, layout.pp, layout.vpp, seed=SEED)
    fixed = variant == "fixed"
    spec = make_spec("learned_absolute" if variant == "abs" else "rope", layout.pp > 1 and not fixed)
    chunks = build_model(spec, layer_spec=packed_local_layer_spec(normalization=spec.normalization))
    init_weights(chunks, seed=SEED)
    batch = make_batch()
    result = {}
    for mode in MODES:
        cfg = loss_config(mode)
        rows = batch if cfg.is_level != "off" else {k: v for k, v in batch.items() if k != "behaviour_logprobs"}
        padded = prepare_microbatches(rows, cfg, MICRO_BATCH_SIZE,
                                      dp_group=parallel_state.get_data_parallel_group())
        packed = pack_microbatches(padded, equal_length=fixed)
        grads_pad, terms_pad, logp_pad = run_once(chunks, padded, forward_step)
        grads_pack, terms_pack, logp_pack = run_once(chunks, packed, packed_forward_step)
        kept = torch.cat([  # positions packing keeps, as [B, S]
            torch.arange(SEQ_LEN).unsqueeze(0) < mb["packed_layout"].lengths.unsqueeze(1) for mb in packed
        ])
        if mode == MODES[0]:
            # Negative control: the same packs with ONE cu_seqlens segment, so rows attend to the
            # rows packed before them; the gradient must then differ clearly from the padded one.
            leaky = [dict(mb, packed_seq_params=single_segment(mb["packed_seq_params"])) for mb in packed]
            grads_control, _, _ = run_once(chunks, leaky, packed_forward_step)
        result[mode] = {"grads_padded": grads_pad, "grads_packed": grads_pack,
                        "terms_padded": terms_pad, "terms_packed": terms_pack,
                        "logp_padded": logp_pad, "logp_packed": logp_pack, "kept": kept,
                        "packed_lengths": [mb["tokens"].shape[1] for mb in packed]}
    result[MODES[0]]["grads_control"] = grads_control
    owner = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    if owner:
        save_result(out_dir, f"{index:02d}-{item}", result)
    compat.destroy_model_parallel()
    mode = MODES[0]
    return f"{item}: {mode} objective padded {result[mode]['terms_padded']['loss/sum']:.8f} " \
           f"packed {result[mode]['terms_packed']['loss/sum']:.8f}" if owner else ""


def run(argv):
    """``argv = [out_dir, *items]`` in a process group that is up (``tests/worker_jobs.py``)."""
    out_dir, items = argv[0], argv[1:]
    for index, item in enumerate(items):
        start = time.perf_counter()
        line = run_item(item, index, out_dir)
        if line:
            print(f"{line} ({time.perf_counter() - start:.2f} s)", flush=True)


def main(argv):
    compat.initialize_distributed()
    run(argv)
    torch_dist.barrier()
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
