"""vLLM as the rollout engine: rollout tokens/s against the Megatron generator, weight-sync seconds at
three model sizes against the floor, and step time synchronous vs ``--async-rollouts 1``.

Three untied Qwen2-style models (fp32, vocabulary 384, heads of 32; the tests' ``engine_models``):
``S`` hidden 128 x 2 layers (0.3 M parameters), ``M`` hidden 256 x 4 layers (2.9 M), ``L`` hidden 512 x 8
layers (25 M, ~100 MB). One vLLM server per model (``.venv-vllm``, launched as the trainer launches it,
all three starting at once), and in this process a gloo world of one with Megatron-Core holding the same
checkpoint (``megatron_rl_agg.hf.load``).

* **Rollouts**: the first ``--prompt-tokens`` tokens of the first ``--prompts`` questions of
  ``examples/gsm8k_mini.jsonl`` (the model's tokenizer), ``--samples`` samples each, at most
  ``--new-tokens`` new tokens, temperature 1, stop at the tokenizer's EOS, on the S and L models:
  vLLM (one ``/v1/completions`` request per prompt, all in flight, the trainer's client) against the
  Megatron generator (``generation.generate``, KV cache, all rows in one micro-batch). Tokens/s = the
  response tokens generated (EOS included) / seconds, median of ``--repeats`` runs.
* **Weight sync**: the trainer's :class:`~megatron_rl_agg.engine.sync.DirectorySync` (export through
  ``--save-hf``'s path to ``/dev/shm``, then pause / ``reload_weights`` / reset the prefix cache / resume)
  against the floor: ``safetensors.torch.save_file`` of the same tensors (the exported file's) to
  ``/dev/shm`` once. Median of ``--repeats``.
* **Step time**: ``scripts/train_grpo.py`` (one process) attached to the S server, ``--train-iters 4``,
  the README's batch (8 prompts x 4 samples, 32 new tokens), ``--async-rollouts 0`` then ``1``. A step's
  time is ``step_time_s + engine_wait_s + sync_export_s + sync_reload_s`` (training with its rollouts,
  the wait for the request in flight, the sync); median over steps 2-3 (step 1 warms up, step 4 has no
  sync).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_engine.py [--json engine.json]   # ~5 min, 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests", "engine"))

from megatron_rl_agg.engine.client import EngineClient  # noqa: E402
from megatron_rl_agg.engine.server import VLLMServer, free_port, running_servers  # noqa: E402
from megatron_rl_agg.engine.sync import DirectorySync  # noqa: E402

SIZES = {"S": dict(hidden=128, layers=2, ffn=192), "M": dict(hidden=256, layers=4, ffn=768),
         "L": dict(hidden=512, layers=8, ffn=1536)}


def _median_time(fn, repeats: int) -> tuple[float, object]:
    runs, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), out


def _servers(models: dict, root: str, max_len: int) -> dict:
    """One server per model (started together by ``running_servers``)."""
    return {name: VLLMServer(os.path.join(REPO, ".venv-vllm", "bin", "python"), path,
                             os.path.join(root, f"vllm_{name}.log"), max_model_len=max_len, seed=0,
                             extra_args=["--max-num-seqs", "32"], timeout=900)
            for name, path in models.items()}


def _megatron_model(path: str, seq: int):
    from megatron_rl_agg.hf.load import HFCheckpoint, gpt_spec_from_hf, load_hf_weights
    from megatron_rl_agg.mcore.build import build_model

    ckpt = HFCheckpoint(path)
    chunks = build_model(gpt_spec_from_hf(ckpt.arch, tp=1, max_seq_length=seq))
    load_hf_weights(chunks, ckpt)
    for chunk in chunks:
        chunk.eval()
    return ckpt, chunks


def rollouts(name, path, client, args) -> dict:
    from megatron_rl_agg.hf.prompts import eos_token_ids, load_tokenizer, read_prompt_records
    from megatron_rl_agg.trainer.rollout import generation

    tok = load_tokenizer(path)
    eos = eos_token_ids(tok, path)
    texts = [q for q, _ in read_prompt_records(os.path.join(REPO, "examples", "gsm8k_mini.jsonl"),
                                               "question", "answer")][: args.prompts]
    prompts = [tok(t)["input_ids"][: args.prompt_tokens] for t in texts]
    seq = max(len(p) for p in prompts) + args.new_tokens
    _, chunks = _megatron_model(path, seq)
    rows = [p for p in prompts for _ in range(args.samples)]
    vocab = len(tok)

    def megatron():
        u = torch.rand(len(rows), args.new_tokens, vocab, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(0))
        noise = -torch.log(-torch.log(u.clamp(min=1e-300)))
        out = generation.generate(chunks, rows, noise, seq_length=seq, max_new_tokens=args.new_tokens,
                                  temperature=1.0, micro_batch_rows=len(rows), kv_cache=True, eos_ids=eos)
        return sum(len(r) for r, _ in out)

    def vllm():
        out = client.generate(prompts, n=args.samples, temperature=1.0, max_tokens=args.new_tokens,
                              stop_token_ids=list(eos), seeds=list(range(len(prompts))))
        return sum(len(c.token_ids) for per in out for c in per)

    vllm()                                            # warm-up (first request compiles / allocates)
    v_s, v_tok = _median_time(vllm, args.repeats)
    m_s, m_tok = _median_time(megatron, args.repeats)
    row = {"model": name, "rows": len(rows), "vllm_tokens": v_tok, "vllm_s": v_s, "vllm_tok_s": v_tok / v_s,
           "megatron_tokens": m_tok, "megatron_s": m_s, "megatron_tok_s": m_tok / m_s}
    print(f"rollouts {name}: {len(rows)} rows; vLLM {v_tok} tokens in {v_s:.3f} s = {v_tok / v_s:.0f} tok/s; "
          f"Megatron {m_tok} tokens in {m_s:.3f} s = {m_tok / m_s:.0f} tok/s", flush=True)
    return row


def weight_sync(name, path, client, args, shm: str) -> dict:
    from safetensors.torch import load_file, save_file

    from megatron_rl_agg.hf.export import export_hf

    ckpt, chunks = _megatron_model(path, 64)
    params = sum(p.numel() for c in chunks for p in c.parameters())
    out = os.path.join(shm, f"sync_{name}", "policy")
    sync = DirectorySync(client, out, is_rank0=True)

    def export(directory):
        export_hf(chunks, ckpt.arch, directory, source_config=ckpt.config, source_dir=ckpt.model_dir,
                  tokenizer_dir=ckpt.model_dir)

    parts = []
    for v in range(1, args.repeats + 1):
        sync.sync(export, v)
        parts.append(dict(sync.last_seconds))
    export_s = statistics.median(p["sync_export_s"] for p in parts)
    reload_s = statistics.median(p["sync_reload_s"] for p in parts)
    total = statistics.median(p["sync_export_s"] + p["sync_reload_s"] for p in parts)
    files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    tensors = {k: v for f in files for k, v in load_file(os.path.join(out, f)).items()}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    floor_path = os.path.join(shm, f"floor_{name}.safetensors")
    floor, _ = _median_time(lambda: save_file(tensors, floor_path), args.repeats)
    os.remove(floor_path)
    row = {"model": name, "params": params, "mbytes": nbytes / 2 ** 20, "sync_s": total, "export_s": export_s,
           "reload_s": reload_s, "floor_s": floor, "ratio": total / floor}
    print(f"sync {name}: {params / 1e6:.2f} M params, {nbytes / 2 ** 20:.1f} MiB: sync {total:.3f} s (export "
          f"{export_s:.3f} + reload {reload_s:.3f}); floor save_file {floor:.3f} s; {total / floor:.1f}x",
          flush=True)
    return row


def step_times(path: str, url: str, root: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests", "engine")]))
    result = {}
    for mode in (0, 1):
        metrics = os.path.join(root, f"steps_async{mode}.jsonl")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
               str(free_port()), os.path.join(REPO, "scripts", "train_grpo.py"), "--hf-checkpoint", path,
               "--rollout-engine", "vllm", "--vllm-url", url, "--prompt-data",
               os.path.join(REPO, "examples", "gsm8k_mini.jsonl"), "--reward", "engine_rewards:digit_fraction",
               "--seq-length", "128", "--max-new-tokens", "32", "--global-batch-size", "8",
               "--num-samples-per-prompt", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "4",
               "--async-rollouts", str(mode), "--metrics-file", metrics, "--no-progress-bar"]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"trainer failed (--async-rollouts {mode}):\n{proc.stderr[-3000:]}")
        lines = [json.loads(x) for x in open(metrics).read().splitlines()]
        per_step = [m["step_time_s"] + m.get("engine_wait_s", 0.0) + m.get("sync_export_s", 0.0)
                    + m.get("sync_reload_s", 0.0) for m in lines]
        result[f"async{mode}_step_s"] = statistics.median(per_step[1:3])
        result[f"async{mode}_per_step"] = per_step
        print(f"step time --async-rollouts {mode}: steps {[round(x, 3) for x in per_step]}; median of steps 2-3 "
              f"{result[f'async{mode}_step_s']:.3f} s", flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from engine_models import save_engine_model

    from megatron_rl_agg.mcore import compat

    root = tempfile.mkdtemp(prefix="bench_engine-")
    shm = tempfile.mkdtemp(prefix="bench_engine-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    models = {name: save_engine_model(os.path.join(root, name), "qwen2", seed=1, **size)
              for name, size in SIZES.items()}
    start, servers = time.perf_counter(), _servers(models, root, max_len=129)
    report = {"rollouts": [], "sync": []}
    try:
        with running_servers(list(servers.values())):
            print(f"3 vLLM servers healthy after {time.perf_counter() - start:.0f} s", flush=True)
            clients = {name: EngineClient([s.url], timeout=300) for name, s in servers.items()}
            compat.initialize_distributed()
            compat.initialize_model_parallel(tp=1, pp=1)
            for name in ("S", "L"):
                report["rollouts"].append(rollouts(name, models[name], clients[name], args))
            for name in SIZES:
                report["sync"].append(weight_sync(name, models[name], clients[name], args, shm))
            clients["S"].reload_weights(models["S"])           # the step-time runs start from the checkpoint
            servers["M"].stop()
            servers["L"].stop()
            report["steps"] = step_times(models["S"], servers["S"].url, root)
    finally:
        compat.destroy_model_parallel()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
