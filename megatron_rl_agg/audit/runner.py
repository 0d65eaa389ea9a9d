"""Running the audit: the launcher (one torchrun per process count, results merged) and the worker (every
rank of one torchrun): the single-process reference gradients from the definitions and one forward-backward
of the plugin's loss per layout and mode."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

import torch

from megatron_rl_agg.audit.batch import make_batch
from megatron_rl_agg.audit.inject import _inject, _injected_forward
from megatron_rl_agg.audit.plan import _loss_config, _model_spec, _Plan, _term_mode
from megatron_rl_agg.audit.report import FAIL, PASS, _report, exit_status, relative_grad_diff
from megatron_rl_agg.core.aggregation import aggregate
from megatron_rl_agg.core.config import MICROBATCH_MEAN
from megatron_rl_agg.parallel.layout import Layout


def _worker_argv(args: argparse.Namespace, layouts: Sequence[Layout], json_path: str) -> list[str]:
    """The flags of this run, spelled out, for the torchrun workers (one process count per launch)."""
    argv = ["check-invariance", "--layouts", " ".join(str(lay) for lay in layouts),
            "--modes", *args.modes, "--policy-loss", *args.policy_loss, "--json", json_path, "--seed", str(args.seed),
            "--kl-estimator", args.kl_estimator, "--kl-aggregation", args.kl_aggregation,
            "--entropy-aggregation", args.entropy_aggregation]
    for flag in ("tolerance", "num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length",
                 "batch_size", "kl_coef", "entropy_coef", "max_response_length", "inject_bug", "num_experts",
                 "moe_router_topk", "moe_token_dispatcher_type", "moe_routing_replay"):
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), str(value)]
    if args.bf16:
        argv.append("--bf16")
    if args.calculate_per_token_loss:
        argv.append("--calculate-per-token-loss")
    if args.is_level != "off":
        argv += ["--is-level", args.is_level] + (["--is-mode", args.is_mode] if args.is_mode else [])
    if args.is_self_normalize:
        argv.append("--is-self-normalize")
    return argv


def _launch(args: argparse.Namespace, plan: _Plan) -> int:
    """One torchrun per distinct process count; merge their JSON results; print the table."""
    by_world: dict[int, list[Layout]] = {}
    for lay in plan.layouts:
        by_world.setdefault(lay.world_size, []).append(lay)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    results, skipped, started = [], [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rl_agg_audit_") as tmp:
        for world, layouts in sorted(by_world.items()):
            names = [str(lay) for lay in layouts]
            if gpus and world > gpus:
                skipped.append(f"{' '.join(names)} (needs {world} GPUs, {gpus} visible)")
                continue
            json_path = os.path.join(tmp, f"world{world}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                   "-m", "megatron_rl_agg.cli", *_worker_argv(args, layouts, json_path)]
            env = dict(os.environ)
            if not gpus:
                env.setdefault("OMP_NUM_THREADS", "1")
            print(f"[check-invariance] torchrun --nproc-per-node {world}: {' '.join(names)}", flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if not os.path.exists(json_path):
                print(f"check-invariance: error: the {world}-process run exited with {proc.returncode} "
                      f"without results\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}", file=sys.stderr)
                return 2
            with open(json_path, encoding="utf-8") as fh:
                results += json.load(fh)["results"]
    return _report(args, plan, results, skipped, time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# the worker (every rank of one torchrun)
# ----------------------------------------------------------------------------------------------

def _worker(args: argparse.Namespace, plan: _Plan) -> int:
    import torch.distributed as torch_dist

    from megatron_rl_agg.mcore import compat, cpu_mode

    started = time.perf_counter()
    rank, world = compat.initialize_distributed()
    layouts = [lay for lay in plan.layouts if lay.world_size == world]
    skipped = [f"{lay} (needs {lay.world_size} processes, this run has {world})"
               for lay in plan.layouts if lay.world_size != world]
    if not layouts:
        if rank == 0:
            print(f"check-invariance: error: no layout needs exactly {world} processes; "
                  f"layouts: {' '.join(str(lay) for lay in plan.layouts)}", file=sys.stderr)
        return 2
    spec = _model_spec(args)
    batch = make_batch(batch_size=args.batch_size, seq_length=args.seq_length, vocab_size=args.vocab_size,
                       seed=args.seed)
    device = cpu_mode.device()
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    reference = _reference_grads(args, plan, spec, batch, layouts)
    results = []
    for lay in layouts:
        t0 = time.perf_counter()
        grads = _layout_grads(args, plan, spec, batch, lay)
        for loss, mode in plan.pairs:
            ref_key = _reference_key(plan, loss, mode, args.batch_size, lay)
            rel, where = relative_grad_diff(grads[(loss, mode)], reference[ref_key])
            results.append({"policy_loss": loss, "mode": mode, "layout": str(lay), "rel_diff": rel,
                            "worst_param": where,
                            "status": PASS if rel <= plan.tolerance else FAIL,
                            "per_layout_reference": ref_key[2] is not None,
                            "seconds": round(time.perf_counter() - t0, 3)})
        if rank == 0:
            print(f"[check-invariance] {lay}: {time.perf_counter() - t0:.1f} s", flush=True)
    compat.destroy_model_parallel()
    if rank == 0:
        status = _report(args, plan, results, skipped, time.perf_counter() - started)
    else:
        status = exit_status(results)
    torch_dist.barrier()
    return status

def _per_microbatch(plan: _Plan, mode: str) -> bool:
    """Whether any term of ``mode``'s loss is a per-micro-batch mean (a layout-dependent objective)."""
    return mode == "token_mean_legacy" or MICROBATCH_MEAN in (_term_mode(plan.kl_aggregation, mode),
                                                              _term_mode(plan.entropy_aggregation, mode))


def _reference_key(plan: _Plan, loss: str, mode: str, batch_size: int,
                   lay: Layout) -> tuple[str, str, Optional[int]]:
    """``(policy loss, mode, micro-batch rows)``; the rows only matter for per-micro-batch terms."""
    return loss, mode, (batch_size // (lay.data_parallel_size * lay.num_microbatches) if _per_microbatch(plan, mode)
                  else None)


def _reference_grads(args, plan: _Plan, spec, batch: dict, layouts: Sequence[Layout]) -> dict:
    """Single-process reference gradients ``{(policy loss, mode, rows or None): {key: grad}}``.

    Built on every rank at tp = pp = 1 WITHOUT DDP: plain autograd through the full model on the whole
    mini-batch, the objective written from the definitions (``aggregate`` on full-vocabulary
    log-probs/entropy; the policy term from :mod:`megatron_rl_agg.core.policy_losses`, a sequence-level
    loss's per-row mean log-ratio taken over the FULL row's loss tokens with ``sequence_mean``: no CP
    shard, no micro-batch split). Also fills ``batch["old_logprobs"]`` / ``batch["ref_logprobs"]``: the current
    log-probs plus fixed noise (so PPO ratios straddle the clip range), broadcast from rank 0. With
    ``--is-level`` also ``batch["behaviour_logprobs"]`` (the old ones plus 0.2 x N(0, 1), capped at 0), and
    the reference multiplies the policy term by the importance weights of
    :func:`megatron_rl_agg.core.corrections.importance_weights` over the WHOLE mini-batch (self-normalized
    over it with ``--is-self-normalize``), every term aggregated over the counted mask of the denominator
    policy.
    """
    import torch.distributed as torch_dist

    from megatron_rl_agg.mcore import compat
    from megatron_rl_agg.core.logits import entropy_from_logits, logprobs_from_logits
    from megatron_rl_agg.core.kl import kl_estimate
    from megatron_rl_agg.core.corrections import importance_weights, self_normalize
    from megatron_rl_agg.core.policy_losses import SEQUENCE, clamped_log_ratio, get_policy_loss, sequence_mean
    from megatron_rl_agg.mcore import routing_replay
    from megatron_rl_agg.mcore.build import build_model
    from megatron_rl_agg.mcore.weights import gather_full_grads, init_weights

    replay = getattr(args, "moe_routing_replay", "off") == "r2"
    compat.initialize_model_parallel(1, 1, seed=args.seed)
    chunks = build_model(spec, wrap_ddp=False, **_replay_config(args))
    init_weights(chunks, seed=args.seed)
    model = chunks[0]
    tokens = batch["tokens"]
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    mask = batch["loss_mask"]

    with torch.no_grad():
        recorder = routing_replay.RouteRecorder(chunks, *tokens.shape) if replay else None
        if recorder is not None:      # R2: the routes of this forward, replayed in every gradient pass
            recorder.before(model)
        logp0 = logprobs_from_logits(model(tokens, positions, None), batch["labels"])
        if recorder is not None:
            recorder.after(model, {"tokens": tokens, "row_offset": 0})
            batch["routes"] = recorder.routes()
            torch_dist.broadcast(batch["routes"], src=0)
        gen = torch.Generator().manual_seed(args.seed + 1)
        noise = torch.randn((3,) + tuple(logp0.shape), generator=gen).to(logp0.device)
        old, ref = logp0 + 0.1 * noise[0], logp0 + 0.3 * noise[1]
        behaviour = (old + 0.2 * noise[2]).clamp(max=0.0)
        for t in (old, ref, behaviour):
            torch_dist.broadcast(t, src=0)
    batch["old_logprobs"], batch["ref_logprobs"] = old, ref
    if plan.is_level != "off":
        batch["behaviour_logprobs"] = behaviour
    full_mask = mask

    keys = {_reference_key(plan, loss, mode, args.batch_size, lay) for loss, mode in plan.pairs
            for lay in layouts}
    out = {}
    for name, mode, rows in sorted(keys, key=lambda k: (k[0], k[1], k[2] or 0)):
        cfg = _loss_config(plan, args, mode, name)
        policy, params = get_policy_loss(name), cfg.policy_loss_params
        is_w, mask = None, full_mask
        if plan.is_level != "off":     # the whole mini-batch at once: the definition
            isw = importance_weights(old, behaviour, full_mask, level=cfg.is_level, mode=cfg.is_mode, low=cfg.is_low,
                                     high=cfg.is_high, veto=cfg.is_veto, denominator=cfg.is_denominator)
            is_w, mask = isw.weights, isw.counted
            if cfg.is_self_normalize:
                is_w = self_normalize(is_w, torch.stack([(is_w * mask).sum(), mask.sum()]))

        def agg(values, term_mode):
            if term_mode in (MICROBATCH_MEAN, "token_mean_legacy"):
                return aggregate(values, mask, "token_mean_legacy", micro_batch_size=rows)
            return aggregate(values, mask, term_mode, group_sizes=batch["group_sizes"],
                             max_response_length=cfg.max_response_length)

        model.zero_grad(set_to_none=True)
        if replay:
            routing_replay.set_replay(model, batch["routes"])
        logits = model(tokens, positions, None).float()
        logp = logprobs_from_logits(logits, batch["labels"])
        seq = None
        if policy.level == SEQUENCE:      # s_i from the mean over row i's loss tokens (full rows)
            seq = sequence_mean(policy.seq_token_log_ratio(clamped_log_ratio(logp, old), batch["advantages"],
                                                           **params), mask)
        pg = policy(logp, old, batch["advantages"], seq_log_ratio=seq, **params)[0]
        if is_w is not None:
            pg = pg * is_w
        objective = agg(pg, mode)
        if cfg.kl_coef > 0:
            kl = kl_estimate(logp, ref, cfg.kl_estimator)
            objective = objective + cfg.kl_coef * agg(kl, cfg.kl_aggregation)
        if cfg.entropy_coef > 0:
            entropy = entropy_from_logits(logits)
            objective = objective - cfg.entropy_coef * agg(entropy, cfg.entropy_aggregation)
        objective.backward()
        if replay:
            routing_replay.clear(chunks)
        out[(name, mode, rows)] = gather_full_grads(chunks)
    del chunks, model
    compat.destroy_model_parallel()
    return out


def _replay_config(args) -> dict:
    """Model-config overrides of ``--moe-routing-replay``: Megatron's RouterReplay on each MoE router."""
    return {"moe_enable_routing_replay": True} if getattr(args, "moe_routing_replay", "off") != "off" else {}


def _layout_grads(args, plan: _Plan, spec, batch: dict, lay: Layout) -> dict:
    """``{(policy loss, mode): {key: grad}}`` after one forward-backward of the plugin's loss in layout ``lay``."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rl_agg.mcore import compat
    from megatron_rl_agg.mcore.loss import forward_step
    from megatron_rl_agg.mcore import routing_replay
    from megatron_rl_agg.mcore.batch import prepare_microbatches
    from megatron_rl_agg.mcore.build import build_model
    from megatron_rl_agg.mcore.weights import gather_full_grads, init_weights

    compat.initialize_model_parallel(lay.tp, lay.pp, lay.vpp, cp=lay.cp, seed=args.seed, ep=lay.ep)
    flag = bool(args.calculate_per_token_loss)
    chunks = build_model(spec, calculate_per_token_loss=flag, **_replay_config(args))
    init_weights(chunks, seed=args.seed)
    dp_group = parallel_state.get_data_parallel_group()
    cp_group = parallel_state.get_context_parallel_group()
    dp_rank = parallel_state.get_data_parallel_rank()
    rows = args.batch_size // lay.data_parallel_size
    mbs = rows // lay.num_microbatches
    keys = ("tokens", "labels", "loss_mask", "advantages", "old_logprobs", "ref_logprobs", "group_ids") + \
        (("behaviour_logprobs",) if plan.is_level != "off" else ())
    keys += ("routes",) if batch.get("routes") is not None else ()
    local = {k: batch[k][dp_rank * rows:(dp_rank + 1) * rows] for k in keys}
    forward_backward = get_forward_backward_func()
    out = {}
    for name, mode in plan.pairs:
        cfg = _loss_config(plan, args, mode, name)
        for chunk in chunks:
            chunk.zero_grad_buffer()
        micro_batches = prepare_microbatches(local, cfg, mbs, dp_group=dp_group, cp_group=cp_group,
                                             calculate_per_token_loss=flag)
        _inject(args.inject_bug, micro_batches, local, cfg, mbs)
        iters = [iter(micro_batches) for _ in chunks]
        with _injected_forward(args.inject_bug):
            forward_backward(forward_step_func=forward_step,
                             data_iterator=iters if len(chunks) > 1 else iters[0], model=chunks,
                             num_microbatches=len(micro_batches), seq_length=args.seq_length,
                             micro_batch_size=mbs, forward_only=False)
        if batch.get("routes") is not None:
            routing_replay.clear(chunks)
        out[(name, mode)] = gather_full_grads(chunks)
    del chunks
    return out
