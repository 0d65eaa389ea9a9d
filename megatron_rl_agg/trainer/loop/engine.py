"""``--rollout-engine vllm``: the engine's client, server and weight sync, built on every rank.

World rank 0 alone holds the HTTP client and, without ``--vllm-url``, launches the server
(:class:`megatron_rl_agg.engine.server.VLLMServer`: ``--vllm-python``, ``--vllm-args``, health within
``--vllm-timeout``, its log at ``<run directory>/vllm_server.log``, where the run directory is ``--save``,
else the directory of ``--metrics-file``, else ``runs/``). Attached servers (``--vllm-url``) are checked
for health up front. The weights go through ``--sync-dir`` (default: a fresh directory under
``/dev/shm``, removed with the server at the end). Every outcome reaches all ranks through
:func:`~megatron_rl_agg.engine.sync.rank0_call`, so a failure raises the same error everywhere.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile

from megatron_rl_agg.engine.client import EngineClient, EngineError, parse_urls
from megatron_rl_agg.engine.server import VLLMServer
from megatron_rl_agg.engine.sync import DirectorySync, rank0_call
from megatron_rl_agg.parallel import dist
from megatron_rl_agg.trainer.rollout.engine_source import EngineSource

__all__ = ["build_engine_source", "default_vllm_python", "run_directory"]

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def default_vllm_python() -> str:
    """``.venv-vllm/bin/python`` of this repository (``bash scripts/setup_vllm.sh`` builds it)."""
    return os.path.join(_REPO, ".venv-vllm", "bin", "python")


def run_directory(args) -> str:
    """Where the run's files go: ``--save``, else ``--metrics-file``'s directory, else ``runs``."""
    if args.save:
        return args.save
    if args.metrics_file and os.path.dirname(args.metrics_file):
        return os.path.dirname(args.metrics_file)
    return "runs"


def _dtype(args) -> str:
    return "bfloat16" if args.bf16 else "float32"


def build_engine_source(args, spec) -> EngineSource:
    """The engine rollout source of ``args`` (every rank calls; collective)."""
    from megatron_rl_agg.mcore import cpu_mode

    device = "cpu" if cpu_mode.device().type == "cpu" else str(cpu_mode.device())
    is_rank0 = dist.rank(dist.world_group()) == 0
    state = {"server": None, "client": None, "made_dir": None}

    def connect():
        if args.vllm_url:
            client = EngineClient(parse_urls(args.vllm_url), timeout=args.vllm_timeout)
            dead = [u for u in client.urls if not client.healthy(u, timeout=min(args.vllm_timeout, 30.0))]
            if dead:
                raise EngineError(f"--vllm-url: no healthy vLLM server at {', '.join(dead)} (GET /health)")
        else:
            server = VLLMServer(args.vllm_python or default_vllm_python(), args.hf_checkpoint,
                                os.path.join(run_directory(args), "vllm_server.log"), dtype=_dtype(args),
                                max_model_len=args.seq_length + 1, seed=args.seed,
                                extra_args=shlex.split(args.vllm_args or ""), timeout=args.vllm_timeout)
            state["server"] = server
            client = EngineClient([server.start()], timeout=args.vllm_timeout)
        state["client"] = client
        for url in client.urls:
            client.model(url)
        sync_root = args.sync_dir
        if sync_root is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            sync_root = state["made_dir"] = tempfile.mkdtemp(prefix="megatron_rl_agg-sync-", dir=base)
        return os.path.join(os.path.abspath(sync_root), "policy"), client.urls

    try:
        sync_dir, urls = rank0_call(connect, is_rank0=is_rank0, device=device)
    except EngineError:
        if state["server"] is not None:
            state["server"].stop()
        raise
    if is_rank0:
        launched = "" if state["server"] is None else \
            f" (launched: pid {state['server'].pid}, log {state['server'].log_path})"
        print(f"[megatron_rl_agg] vLLM rollouts from {', '.join(urls)}{launched}; weights synced through "
              f"{sync_dir}", flush=True)
    sync = DirectorySync(state["client"], sync_dir, is_rank0=is_rank0, device=device)

    def cleanup():
        if state["server"] is not None:
            state["server"].stop()
        if state["made_dir"] is not None:
            shutil.rmtree(state["made_dir"], ignore_errors=True)

    return EngineSource(spec, state["client"], sync, is_rank0=is_rank0, device=device,
                        async_rollouts=args.async_rollouts, train_iters=args.train_iters,
                        mini_batches_per_step=args.mini_batches_per_step, cleanup=cleanup,
                        verify_tol=args.verify_sync_tol if args.verify_sync else None,
                        micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
                        server=state["server"])
