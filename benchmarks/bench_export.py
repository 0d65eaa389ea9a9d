"""Peak host memory per rank of the Hugging Face export, per-stage writers against the gather-everything route.

A Llama-style model of about 100 MB (fp32: hidden 512, 6 layers, FFN 1536, vocabulary 8192, untied
embeddings; 27.3 M parameters) is exported by 8 processes at PP2 x TP2 x DP2 (gloo, CPU mode), twice:

* ``export``: ``megatron_rl_agg.hf.export.export_hf`` (DP x CP replica 0 writes; each pipeline stage
  writes its own tensors, TP-gathered one at a time; rank 0 writes headers, index and config).
* ``gather-all``: the route the export took before: every rank gathers every shard of every replica as
  fp32 (``gather_full_params``, one ``all_gather_object`` over the world), rank 0 splits the full model
  into Hugging Face tensors (``full_to_hf``) and writes them (``write_hf_dir``).

Both routes' weight files are checked to be byte-for-byte equal. Per rank the benchmark reports the peak resident
memory during the call above the resident memory just before it (the kernel's high-water mark ``VmHWM``,
reset through ``/proc/self/clear_refs``, minus ``VmRSS``: what the call adds to a process that already
holds its model), next to two yardsticks: ``stage`` (the bytes of the parameters this rank holds, its
pipeline stage's TP shard) and ``max tensor`` (the largest full tensor of the model in fp32). Honest
limits: glibc may keep small freed blocks in its heap, so the figure is what the process's resident
memory grew to, not a count of live tensors; gloo's own buffers during the collectives are included.

    python benchmarks/bench_export.py [--json export.json]           # one run, ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

LAYOUT = dict(tp=2, pp=2)          # x DP2 on 8 processes
NPROC = 8


def _save_model(path: str) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)


def _worker(root: str) -> None:
    import torch.distributed as torch_dist

    from bench_memory import PeakMeter
    from megatron_rl_agg.hf.export import export_hf, full_to_hf, write_hf_dir
    from megatron_rl_agg.hf.load import HFCheckpoint, gpt_spec_from_hf, load_hf_weights
    from megatron_rl_agg.mcore import compat
    from megatron_rl_agg.mcore.build import build_model
    from megatron_rl_agg.mcore.weights import gather_full_params

    compat.initialize_distributed()
    rank = torch_dist.get_rank()
    try:
        compat.initialize_model_parallel(LAYOUT["tp"], LAYOUT["pp"], None, seed=1)
        ckpt = HFCheckpoint(os.path.join(root, "model"))
        chunks = build_model(gpt_spec_from_hf(ckpt.arch, tp=LAYOUT["tp"], max_seq_length=64), wrap_ddp=False)
        load_hf_weights(chunks, ckpt)
        stage = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
        meter, result = PeakMeter(torch.device("cpu")), {"rank": rank, "stage_mib": stage / 2**20}
        gc.collect()
        torch_dist.barrier()
        meter.start()
        export_hf(chunks, ckpt.arch, os.path.join(root, "export"), source_config=ckpt.config,
                  source_dir=ckpt.model_dir)
        result["export_mib"] = meter.peak()
        gc.collect()
        torch_dist.barrier()
        meter.start()
        full = gather_full_params(chunks)
        if rank == 0:
            write_hf_dir(os.path.join(root, "gather-all"), full_to_hf(ckpt.arch, full, torch.float32),
                         json.loads(json.dumps(ckpt.config)))
        result["max_tensor_mib"] = max(t[0].numel() if k.startswith("decoder.layers.") else t.numel()
                                       for k, t in full.items()) * 4 / 2**20        # one layer of a stacked key
        del full
        torch_dist.barrier()
        result["gather_all_mib"] = meter.peak()
        with open(os.path.join(root, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh)
        compat.destroy_model_parallel()
    finally:
        compat.destroy_distributed()


def _weight_files_differ(a: str, b: str) -> list[str]:
    """The weight files (safetensors and index) that differ in name or bytes between two exports."""
    def weights(d):
        return {f for f in os.listdir(d) if f.endswith(".safetensors") or f.endswith(".index.json")}

    out = sorted(weights(a) ^ weights(b))
    for f in sorted(weights(a) & weights(b)):
        with open(os.path.join(a, f), "rb") as fa, open(os.path.join(b, f), "rb") as fb:
            if fa.read() != fb.read():
                out.append(f)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the per-rank figures here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker)
        return
    with tempfile.TemporaryDirectory() as root:
        _save_model(os.path.join(root, "model"))
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(HERE), os.environ.get("PYTHONPATH")])))
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
                        os.path.abspath(__file__), "--worker", root], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        rows = [json.load(open(os.path.join(root, f"rank{r}.json"), encoding="utf-8")) for r in range(NPROC)]
        same = _weight_files_differ(os.path.join(root, "export"), os.path.join(root, "gather-all"))
        model_mib = sum(os.path.getsize(os.path.join(root, "export", f)) for f in os.listdir(os.path.join(root, "export"))
                        if f.endswith(".safetensors")) / 2**20
    print(f"model {model_mib:.1f} MiB (fp32 safetensors), 8 processes PP2 x TP2 x DP2; files differing between "
          f"the two routes: {same or 'none'}")
    print(f"{'rank':>4} {'stage MiB':>10} {'max tensor MiB':>15} {'export peak MiB':>16} {'gather-all peak MiB':>20}")
    for r in rows:
        print(f"{r['rank']:>4} {r['stage_mib']:>10.1f} {r['max_tensor_mib']:>15.1f} {r['export_mib']:>16.1f} "
              f"{r['gather_all_mib']:>20.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"model_mib": model_mib, "differing_files": same, "ranks": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
