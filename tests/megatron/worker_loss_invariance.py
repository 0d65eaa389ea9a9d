"""torchrun worker: the plugin's RL loss function on a real Megatron GPT at several layouts.

    python -m torch.distributed.run --standalone --nproc_per_node 1 \
        tests/megatron/worker_loss_invariance.py OUT_DIR
    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/megatron/worker_loss_invariance.py OUT_DIR

The process count picks the work (all of it in one launch, re-initialising Megatron's model-parallel
state between layouts):

* 1 process: layouts ``dp1+m1`` and ``dp1+m4``; the whole-batch reference objective (full-vocabulary
  log-softmax on the logits of one forward pass, aggregated with ``aggregation.aggregate``); the
  KL/entropy micro-batch checks (``dp1+m1`` vs ``dp1+m4`` on a batch of equal row lengths).
* 2 processes: layouts ``dp2+m2``, ``tp2``, ``pp2+m4``, ``pp2+vpp2+m4`` and the KL/entropy check at
  ``dp2+m2``; the TP2 vocab-parallel log-prob/entropy checks against the full-logit reference (the
  separate functions and the fused kernel loss_func uses, with its collective count); the
  context-parallel refusal.
* the policy losses (``POLICY_CONFIGS``, tag ``pl``): every loss x token_mean / seq_mean_token_mean /
  prompt_mean and, token-level losses, seq_mean_token_sum_norm, at ``dp1+m1``, ``dp1+m4`` (1 process),
  ``dp2+m2``, ``tp2``, ``pp2+m4``, ``cp2+m4`` (also with calculate_per_token_loss) (2 processes),
  ``cp2+dp2+m2`` (4 processes), and packed (THD) at ``dp1+m4``, ``pp2+m4`` and ``dp2+m2`` with
  calculate_per_token_loss, where the PPO surrogate's four modes also run (tag ``pg``); one model build
  per layout for all of them.

For every layout and loss configuration it prepares the rank's share of the SAME global mini-batch with
``prepare_microbatches``, runs one forward-backward through ``get_forward_backward_func()`` with the
plugin's ``forward_step`` (Megatron DDP, tied embeddings, fp32), reduces the reports with
``reduce_metrics`` and gathers the full gradient. Rank 0 saves ``{"grads", "metrics"}`` per
``(layout, config)`` with ``torchrun_utils.save_result``; the pytest side compares them.
"""

from __future__ import annotations

import math
import pathlib
import sys
import time

import torch
import torch.distributed as torch_dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from torchrun_utils import save_result  # noqa: E402

from megatron_rl_agg.core.corrections import MASKED, REJECTED  # noqa: E402
from megatron_rl_agg.core.kl import kl_estimate  # noqa: E402
from megatron_rl_agg.parallel.corrections import mini_batch_importance_weights  # noqa: E402
from megatron_rl_agg.core.logits import entropy_from_logits, logprobs_from_logits  # noqa: E402
from megatron_rl_agg.core.policy_losses import (clamped_log_ratio, get_policy_loss,  # noqa: E402
                                                ppo_clipped_surrogate, sequence_mean)
from megatron_rl_agg.mcore import compat
from megatron_rl_agg.core.aggregation import aggregate  # noqa: E402
from megatron_rl_agg.core.config import LossConfig  # noqa: E402
from megatron_rl_agg.mcore.build import build_model, unwrap  # noqa: E402
from megatron_rl_agg.mcore.spec import GPTSpec  # noqa: E402
from megatron_rl_agg.mcore.weights import init_weights  # noqa: E402
from megatron_rl_agg.parallel.layout import parse_layout  # noqa: E402

SEED = 4321
SPEC = GPTSpec(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64, max_seq_length=12,
               ffn_hidden_size=64, tie_embeddings=True)
SEQ = 12
PROMPT = 2
# Loss tokens per row: unequal, row 3 fully masked. Position t predicts token t + 1, so a row's loss
# tokens are positions PROMPT - 1 .. PROMPT - 2 + n.
ROW_TOKENS = [9, 2, 6, 0, 8, 4, 10, 1]
# Prompt groups (sizes 2, 3, 2, 1): group 1 = rows 2, 3, 4 straddles the DP ranks at DP2 (rows 0-3 on
# rank 0) and micro-batches 1/2 at two rows per micro-batch; group 2 = rows 5, 6 straddles
# micro-batches 2/3; row 3 (masked) sits inside group 1.
GROUP_IDS = [0, 0, 1, 1, 1, 2, 2, 3]
GROUP_SIZES = [2, 3, 2, 1]
HORIZON = 11
EQUAL_TOKENS = [4] * 8      # KL/entropy check: equal micro-batches have equal token counts

PG = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=1.5, max_response_length=HORIZON)
MODES = ["token_mean", "token_sum", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm",
         "prompt_mean", "token_mean_legacy"]
CONFIGS = {mode: LossConfig(loss_aggregation=mode, **PG) for mode in MODES}
# KL and entropy with exact global aggregation (token_mean) next to a seq-mean policy term.
CONFIGS["global_kl_entropy"] = LossConfig(loss_aggregation="seq_mean_token_mean", kl_coef=0.1,
                                          kl_estimator="k3", kl_aggregation="token_mean", entropy_coef=0.05,
                                          entropy_aggregation="token_mean", **PG)
# Off-policy correction (behaviour log-probs differ from the proximal ones, see make_batch): token and
# sequence-level weights (product and geometric), with and without mini-batch self-normalization, both
# denominator policies and a row veto; they run at every "pg" layout on the same batch.
IS_CONFIGS = {
    "is_token_truncate": LossConfig(loss_aggregation="token_mean", is_level="token", is_high=1.3, **PG),
    "is_token_clip_sn": LossConfig(loss_aggregation="seq_mean_token_mean", is_level="token", is_mode="clip",
                                   is_low=0.8, is_high=1.2, is_self_normalize=True, **PG),
    "is_geometric_mask_sn": LossConfig(loss_aggregation="prompt_mean", is_level="geometric", is_mode="mask",
                                       is_low=0.9, is_high=1.1, is_denominator="survivors",
                                       is_self_normalize=True, **PG),
    "is_sequence_veto": LossConfig(loss_aggregation="seq_mean_token_sum_norm", is_level="sequence",
                                   is_mode="clip", is_low=0.5, is_high=2.0, is_veto=0.5,
                                   is_denominator="survivors", **PG),
}
CONFIGS.update(IS_CONFIGS)
# KL and entropy with the default micro-batch mean, policy term switched off (advantages 0).
KL_CONFIGS = {f"kl_{est}": LossConfig(kl_coef=0.1, kl_estimator=est, entropy_coef=0.05, **PG)
              for est in ("k1", "k2", "k3")}

# Every other registered policy loss (ppo_clip is CONFIGS above) x every issue mode it defines: token_mean,
# seq_mean_token_mean, prompt_mean (prompt groups straddle ranks and micro-batches) and, for the token-level
# losses, seq_mean_token_sum_norm (the sequence-level ones refuse it). Clip bounds wide enough that some
# sequences / tokens are clipped and others not; under CP the sequence-level losses reduce one scalar per
# sequence over the CP group.
POLICY_PARAMS = {"gspo": dict(clip_eps_low=0.1, clip_eps_high=0.15),
                 "gspo_token": dict(clip_eps_low=0.1, clip_eps_high=0.15), "gmpo": {}, "cispo": {}, "sapo": {},
                 "dppo_tv": dict(dppo_tv_delta=0.005), "dppo_kl": dict(dppo_kl_delta=0.001)}
POLICY_MODES = ("token_mean", "seq_mean_token_mean", "prompt_mean", "seq_mean_token_sum_norm")
SEQUENCE_LEVEL = ("gspo", "gspo_token", "gmpo")
POLICY_CONFIGS = {f"{name}.{mode}": LossConfig(loss_aggregation=mode, policy_loss=name,
                                               max_response_length=HORIZON, **params)
                  for name, params in POLICY_PARAMS.items() for mode in POLICY_MODES
                  if not (name in SEQUENCE_LEVEL and mode == "seq_mean_token_sum_norm")}
# Off-policy correction with a sequence-level loss: gspo with sequence-level importance weights (the product
# over each FULL row, masked outside [0.5, 2], self-normalized over the mini-batch): the per-sequence ratio
# and the per-row weight both span CP shards; it runs at every policy layout.
POLICY_CONFIGS["gspo.seq_mean_token_mean_is"] = LossConfig(
    loss_aggregation="seq_mean_token_mean", policy_loss="gspo", is_level="sequence", is_mode="mask", is_low=0.5,
    is_high=2.0, is_self_normalize=True, **POLICY_PARAMS["gspo"])
# Every policy config at every one of these layouts, from ONE model build per layout. ":packed" packs each
# micro-batch into one THD sequence (packed_local_layer_spec, the same weights; equal-length packs under
# PP) and also runs the PPO surrogate of PACKED_PG_MODES under the "pg" tag. Packing under CP is refused
# (packing.pack_micro_batch; tests/test_packing.py), so there is no CP packed layout.
POLICY_LAYOUTS = {1: [("dp1+m1", 8), ("dp1+m4", 2), ("dp1+m4:packed", 2)],
                  2: [("dp2+m2", 2), ("tp2", 8), ("pp2+m4", 2), ("cp2+m4", 2), ("cp2+m4:flag", 2),
                      ("pp2+m4:packed", 2), ("dp2+m2:flag,packed", 2)],
                  4: [("cp2+dp2+m2", 2)]}
PACKED_PG_MODES = POLICY_MODES

# A ":flag" suffix runs the layout with calculate_per_token_loss=True (Megatron's 3-tuple contract).
LAYOUTS = {1: [("dp1+m1", 8), ("dp1+m4", 2)],
           2: [("dp2+m2", 2), ("tp2", 8), ("pp2+m4", 2), ("pp2+vpp2+m4", 2), ("cp2+m4", 2),
               ("cp2+m4:flag", 2), ("dp2+m2:flag", 2)],
           4: [("cp2+dp2+m2", 2), ("cp2+tp2+m4", 2), ("cp2+pp2+m4", 2), ("cp2+dp2+m2:flag", 2),
               ("cp2+tp2+m4:flag", 2), ("cp2+pp2+m4:flag", 2)]}
KL_LAYOUTS = {1: [("dp1+m1", 8), ("dp1+m4", 2)], 2: [("dp2+m2", 2), ("cp2+m4", 2), ("cp2+m4:flag", 2)],
              4: []}


def make_batch(row_tokens, seed=SEED):
    """The whole mini-batch (identical on every rank).

    At init the policy is near uniform (logits ~ 0.02 * randn, so logp ~ -ln V within a few 0.01), so
    behaviour log-probs of -ln V + N(0, 0.4) put ratios on both sides of the clip band. The first loss
    token of every row gets a behaviour log-prob lowered by 1 (ratio ~ e > 1.5 = dual_clip_c) and the
    advantages alternate in sign, so the dual clip is active on the negative rows whatever the weights.
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(row_tokens)
    tokens = torch.randint(1, SPEC.vocab_size, (n, SEQ + 1), generator=gen)
    t = torch.arange(SEQ + 1)[None, :]
    lengths = torch.tensor(row_tokens)[:, None] + PROMPT
    tokens[t >= lengths] = 0                                  # right padding
    pos = torch.arange(SEQ)[None, :]
    mask = ((pos >= PROMPT - 1) & (pos < lengths - 1)).float()
    base = -math.log(SPEC.vocab_size)
    old = base + 0.4 * torch.randn(n, SEQ, generator=gen)
    old[:, PROMPT - 1] -= 1.0
    signs = torch.tensor([1.0, -1.0]).repeat((n + 1) // 2)[:n]
    return dict(
        tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), loss_mask=mask,
        position_ids=pos.expand(n, SEQ).contiguous(),
        advantages=signs * (0.2 + torch.rand(n, generator=gen)),
        old_logprobs=old,
        ref_logprobs=base + 0.3 * torch.randn(n, SEQ, generator=gen),
        group_ids=torch.tensor(GROUP_IDS if n == len(GROUP_IDS) else [0] * n),
        behaviour_logprobs=(old + 0.3 * torch.randn(n, SEQ, generator=gen)).clamp(max=-0.01),
    )


def rank_share(batch, dp_rank, dp_size):
    n = batch["tokens"].shape[0] // dp_size
    return {k: v[dp_rank * n:(dp_rank + 1) * n] for k, v in batch.items()}


def run_config(chunks, batch, cfg, mbs, dp_group, flag=False, packed=False):
    """One forward-backward of ``cfg`` on the rank's share; returns (full grads, reduced metrics). With
    ``packed`` each micro-batch is one THD sequence (``pack_microbatches``; equal lengths under PP)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rl_agg.mcore.loss import forward_step
    from megatron_rl_agg.mcore.packing import pack_microbatches, packed_forward_step
    from megatron_rl_agg.mcore.batch import prepare_microbatches
    from megatron_rl_agg.parallel.metrics import reduce_metrics
    from megatron_rl_agg.mcore.weights import gather_full_grads

    if cfg.is_level == "off":    # the configs without correction run exactly as without behaviour log-probs
        batch = {k: v for k, v in batch.items() if k != "behaviour_logprobs"}
    share = rank_share(batch, parallel_state.get_data_parallel_rank(), dist_size(dp_group))
    cp_group = parallel_state.get_context_parallel_group()
    micro_batches = prepare_microbatches(share, cfg, mbs, dp_group=dp_group, cp_group=cp_group,
                                         calculate_per_token_loss=flag)
    step, seq_length, rows = forward_step, SEQ, mbs
    if packed:
        micro_batches = pack_microbatches(micro_batches,
                                          equal_length=parallel_state.get_pipeline_model_parallel_world_size() > 1)
        step, seq_length, rows = packed_forward_step, micro_batches[0]["tokens"].shape[1], 1
    for chunk in chunks:
        chunk.zero_grad_buffer()
    iterator = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    reports = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iterator, model=chunks,
        num_microbatches=len(micro_batches), seq_length=seq_length, micro_batch_size=rows, forward_only=False)
    grads = gather_full_grads(chunks)
    # Reports exist on the last pipeline stage only; reduce them over its dp x cp group there (each CP
    # rank reports partial sums of its shards).
    metrics = (reduce_metrics(reports, parallel_state.get_data_parallel_group(with_context_parallel=True))
               if parallel_state.is_pipeline_last_stage() else {})
    gathered = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, metrics)
    return grads, next(m for m in gathered if m)


def dist_size(group):
    return torch_dist.get_world_size(group)


def run_layouts(out_dir, layouts, groups, batch):
    """``groups``: ``[(tag, configs)]``, every config of every group run from ONE model build per layout.
    A layout's suffix holds comma-separated variants: ``flag`` (calculate_per_token_loss=True), ``packed``
    (THD micro-batches through ``packed_local_layer_spec``, the same weights)."""
    from megatron.core import parallel_state

    from megatron_rl_agg.mcore.packed_attention import packed_local_layer_spec

    for layout_text, mbs in layouts:
        start = time.perf_counter()
        layout_only, _, variant = layout_text.partition(":")
        variants = set(variant.split(",")) if variant else set()
        if not variants <= {"flag", "packed"}:
            raise ValueError(f"unknown variant in {layout_text!r}; valid: flag, packed")
        layout = parse_layout(layout_only)
        compat.initialize_model_parallel(layout.tp, layout.pp, layout.vpp, cp=layout.cp, seed=SEED)
        flag, packed = "flag" in variants, "packed" in variants
        layer_spec = packed_local_layer_spec(normalization=SPEC.normalization) if packed else None
        chunks = build_model(SPEC, calculate_per_token_loss=flag, layer_spec=layer_spec)
        init_weights(chunks, seed=SEED)
        dp_group = parallel_state.get_data_parallel_group()
        for tag, configs in groups:
            for name, cfg in configs.items():
                grads, metrics = run_config(chunks, batch, cfg, mbs, dp_group, flag, packed)
                if torch_dist.get_rank() == 0:
                    save_result(out_dir, f"{tag}-{layout_text}-{name}",
                                {"grads": grads, "metrics": metrics, "micro_batch_size": mbs})
        compat.destroy_model_parallel()
        if torch_dist.get_rank() == 0:
            print(f"{'+'.join(tag for tag, _ in groups)} {layout_text}: {sum(len(c) for _, c in groups)} configs "
                  f"in {time.perf_counter() - start:.2f} s", flush=True)


def reference_objectives(out_dir, batch):
    """Whole-batch objectives from one forward pass of the full model and full-vocabulary math."""
    compat.initialize_model_parallel(1, 1, seed=SEED)
    (chunk,) = build_model(SPEC)
    init_weights([chunk], seed=SEED)
    with torch.no_grad():
        logits = unwrap(chunk)(batch["tokens"], batch["position_ids"], None).double()
    compat.destroy_model_parallel()
    mask = batch["loss_mask"]
    logp = logprobs_from_logits(logits, batch["labels"])
    ent = entropy_from_logits(logits)
    out = {}
    for name, cfg in CONFIGS.items():
        pg = ppo_clipped_surrogate(logp, batch["old_logprobs"].double(), batch["advantages"],
                                          clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
                                          dual_clip_c=cfg.dual_clip_c)[0]
        counted = mask
        if cfg.is_level != "off":     # whole-batch weights (one process: the mini-batch normalization)
            isw = mini_batch_importance_weights(batch["old_logprobs"].double(),
                                                batch["behaviour_logprobs"].double(), mask, cfg)
            pg, counted = pg * isw.weights, isw.counted
            out[f"{name}/counted"] = float(counted.sum())
            out[f"{name}/rejected_or_masked"] = float(((isw.flags & (MASKED | REJECTED)) > 0).sum())
        for mbs in (8, 2):   # the legacy objective depends on the micro-batch size
            out[f"{name}/mbs{mbs}/policy"] = float(aggregate(
                pg, counted, cfg.loss_aggregation, group_sizes=GROUP_SIZES, max_response_length=HORIZON,
                micro_batch_size=mbs))
    old = batch["old_logprobs"].double()
    adv = batch["advantages"].double().unsqueeze(-1).expand_as(logp)
    for name, cfg in POLICY_CONFIGS.items():
        loss = get_policy_loss(cfg.policy_loss)
        seq = None
        if loss.level == "sequence":
            seq = sequence_mean(loss.seq_token_log_ratio(clamped_log_ratio(logp, old), adv,
                                                         **cfg.policy_loss_params), mask)
        pg = loss(logp, old, adv, seq_log_ratio=seq, **cfg.policy_loss_params)[0]
        counted = mask
        if cfg.is_level != "off":     # whole-batch weights (one process: the mini-batch normalization)
            isw = mini_batch_importance_weights(old, batch["behaviour_logprobs"].double(), mask, cfg)
            pg, counted = pg * isw.weights, isw.counted
            out[f"pl/{name}/masked"] = float(((isw.flags & MASKED) > 0).sum())
        out[f"pl/{name}"] = float(aggregate(pg, counted, cfg.loss_aggregation, group_sizes=GROUP_SIZES,
                                            max_response_length=HORIZON))
    kl = kl_estimate(logp, batch["ref_logprobs"].double(), "k3")
    out["kl_token_mean"] = float(aggregate(kl, mask, "token_mean"))
    out["entropy_token_mean"] = float(aggregate(ent, mask, "token_mean"))
    save_result(out_dir, "reference", out)


def tp2_vocab_parallel_check(out_dir):
    """Vocab-parallel log-probs/entropy and their gradients vs the full-logit reference at TP2."""
    from megatron.core import parallel_state

    from megatron_rl_agg.mcore.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs

    compat.initialize_model_parallel(tp=2, seed=SEED)
    gen = torch.Generator().manual_seed(7)
    v = SPEC.vocab_size
    full = 4 * torch.randn(3, 5, v, generator=gen)
    labels = torch.randint(0, v, (3, 5), generator=gen)
    u, w = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    rank = parallel_state.get_tensor_model_parallel_rank()
    part = v // 2
    shard = full[..., rank * part:(rank + 1) * part].clone().requires_grad_(True)
    ent = vocab_parallel_entropy(shard * 1.0)
    lp = vocab_parallel_logprobs(shard * 1.0, labels)   # rewrites its (fresh) input in place
    ((u * lp).sum() + (w * ent).sum()).backward()
    ref = full.clone().requires_grad_(True)
    ref_ent, ref_lp = entropy_from_logits(ref), logprobs_from_logits(ref, labels)
    ((u * ref_lp).sum() + (w * ref_ent).sum()).backward()
    result = {
        "logprob_max_abs_diff": (lp - ref_lp).abs().max().item(),
        "entropy_max_abs_diff": (ent - ref_ent).abs().max().item(),
        "grad_max_abs_diff": (shard.grad - ref.grad[..., rank * part:(rank + 1) * part]).abs().max().item(),
        "grad_scale": ref.grad.abs().max().item(),
        "labels_on_other_rank": int(((labels // part) != rank).sum()),
    }
    gathered = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, result)
    compat.destroy_model_parallel()
    if torch_dist.get_rank() == 0:
        save_result(out_dir, "tp2_vocab_parallel", {"per_rank": gathered})


def tp2_fused_check(out_dir):
    """The fused kernel loss_func uses (``vocab_parallel_logprobs_and_entropy``) at TP2 vs the full-logit
    reference: forward values, the gradient of each rank's shard, for fp32 and bf16 logits and both
    gradient paths (entropy as a metric, entropy with gradient), with masked tokens (weights 0) and rows
    whose max lies far in one rank's shard (rank 1's half of rows 0-1 shifted by +40, so rank 0 rescales
    by exp(-40)-ish). Also counts the collectives of one forward and one backward."""
    from megatron.core import parallel_state

    from megatron_rl_agg.mcore.logprobs import vocab_parallel_logprobs_and_entropy

    compat.initialize_model_parallel(tp=2, seed=SEED)
    rank = parallel_state.get_tensor_model_parallel_rank()
    v = SPEC.vocab_size
    part = v // 2
    gen = torch.Generator().manual_seed(11)
    full32 = 4 * torch.randn(4, 6, v, generator=gen)
    full32[:2, :, part:] += 40.0
    labels = torch.randint(0, v, (4, 6), generator=gen)
    mask = torch.rand(4, 6, generator=gen) < 0.6
    u, w = torch.randn(4, 6, generator=gen) * mask, torch.randn(4, 6, generator=gen) * mask

    calls = []
    original = torch_dist.all_reduce

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    cases = {}
    for dtype in (torch.float32, torch.bfloat16):
        full = full32.to(dtype)
        for entropy_grad in (False, True):
            shard = full[..., rank * part:(rank + 1) * part].clone().requires_grad_(True)
            torch_dist.all_reduce = counted
            calls.clear()
            lp, ent = vocab_parallel_logprobs_and_entropy(shard * 1, labels, entropy_grad=entropy_grad,
                                                          chunk_rows=5)
            forward_calls = len(calls)
            calls.clear()
            ((u * lp).sum() + ((w * ent).sum() if entropy_grad else 0)).backward()
            backward_calls = len(calls)
            torch_dist.all_reduce = original
            ref = full.float().clone().requires_grad_(True)
            ref_lp, ref_ent = logprobs_from_logits(ref, labels), entropy_from_logits(ref)
            ((u * ref_lp).sum() + ((w * ref_ent).sum() if entropy_grad else 0)).backward()
            ref_grad = ref.grad[..., rank * part:(rank + 1) * part]
            if dtype == torch.bfloat16:    # the kernel computes in fp32 and rounds its gradient once
                ref_grad = ref_grad.to(dtype)
            cases[f"{str(dtype).split('.')[-1]}/{'grad' if entropy_grad else 'metric'}"] = {
                "logprob_max_abs_diff": (lp - ref_lp).abs().max().item(),
                "entropy_max_abs_diff": (ent - ref_ent).abs().max().item(),
                # max(|g - g_ref| - 2^-7 |g_ref|): <= 0 within one bf16 rounding step of the reference
                "grad_excess_over_bf16_step": ((shard.grad.float() - ref_grad.float()).abs()
                                               - 2 ** -7 * ref_grad.float().abs()).max().item(),
                "grad_max_abs_diff": (shard.grad.float() - ref_grad.float()).abs().max().item(),
                "grad_scale": ref.grad.abs().max().item(),
                "masked_grad_max_abs": shard.grad[~mask].abs().max().item(),
                "grad_dtype": str(shard.grad.dtype),
                "entropy_requires_grad": ent.requires_grad,
                "forward_all_reduces": forward_calls, "backward_all_reduces": backward_calls,
            }
    result = {"cases": cases, "labels_on_other_rank": int(((labels // part) != rank).sum())}
    gathered = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, result)
    compat.destroy_model_parallel()
    if torch_dist.get_rank() == 0:
        save_result(out_dir, "tp2_fused", {"per_rank": gathered})


def run(argv):
    """``argv = [out_dir]``: this world size's layouts, in a process group that is up
    (``tests/worker_jobs.py``)."""
    out_dir = argv[0]
    world = torch_dist.get_world_size()
    start = time.perf_counter()
    batch = make_batch(ROW_TOKENS)
    run_layouts(out_dir, LAYOUTS[world], [("pg", CONFIGS)], batch)
    packed_pg = {mode: CONFIGS[mode] for mode in PACKED_PG_MODES}
    for layout in POLICY_LAYOUTS[world]:
        groups = [("pl", POLICY_CONFIGS)] + ([("pg", packed_pg)] if "packed" in layout[0] else [])
        run_layouts(out_dir, [layout], groups, batch)
    kl_batch = make_batch(EQUAL_TOKENS, seed=SEED + 1)
    kl_batch["advantages"] = torch.zeros(len(EQUAL_TOKENS))
    run_layouts(out_dir, KL_LAYOUTS[world], [("kl", KL_CONFIGS)], kl_batch)
    if world == 1:
        reference_objectives(out_dir, batch)
    elif world == 2:
        tp2_vocab_parallel_check(out_dir)
        tp2_fused_check(out_dir)
    torch_dist.barrier()
    if torch_dist.get_rank() == 0:
        print(f"total {time.perf_counter() - start:.2f} s", flush=True)


def main(out_dir):
    compat.initialize_distributed()
    run([out_dir])
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
