#!/usr/bin/env bash
# Short GPU check: NCCL, bf16, the Transformer Engine layer spec when it imports (local spec otherwise),
# on-policy training at DP and at TP/PP, a save and a resume at another layout; then the GPU figures of
# docs/performance.md: the step-time overhead benchmark, KV-cached generation tokens/s, and (2+ GPUs)
# one context-parallel and one expert-parallel training run and the invariance audit at cp2 and ep2.
#
#   bash scripts/gpu_smoke.sh              # uses every visible GPU on this node (at least 1)
#   OUT_DIR=/tmp/smoke bash scripts/gpu_smoke.sh
#
# Prints the first and last steps' reward and the step time of each run and the benchmark tables
# (JSON copies in $OUT_DIR); exits non-zero on any failure. The CP / EP runs need a checkout whose
# scripts/train_grpo.py has --context-parallel-size and --expert-model-parallel-size/--num-experts and
# whose audit knows the cp2 / ep2 layouts: without them argparse stops the script there, after the
# figures above are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT_DIR=${OUT_DIR:-runs/gpu_smoke}
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then echo "gpu_smoke: no CUDA device visible" >&2; exit 1; fi
TE=$("$PYTHON" -c "import transformer_engine" 2>/dev/null && echo transformer_engine || echo local)
echo "gpu_smoke: $NGPU GPU(s), layer spec: $TE"
rm -rf "$OUT_DIR"; mkdir -p "$OUT_DIR"
COMMON=(--config configs/cpu_demo.yaml --bf16 --transformer-impl "$TE" --train-iters 30 --no-progress-bar
        --num-layers 4 --hidden-size 128 --num-attention-heads 8 --kl-coef 0.01)
run() {  # run NAME NPROC FLAGS...
  local name=$1 nproc=$2; shift 2
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" scripts/train_grpo.py \
    "${COMMON[@]}" --metrics-file "$OUT_DIR/$name.jsonl" "$@"
  "$PYTHON" - "$OUT_DIR/$name.jsonl" "$name" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
t = sorted(r["step_time_s"] for r in rows)[len(rows) // 2]
print(f"{sys.argv[2]}: steps {rows[0]['step']}..{rows[-1]['step']} reward {rows[0]['reward_mean']:.3f} -> "
      f"{rows[-1]['reward_mean']:.3f}, median step {t:.3f} s")
PY
}
run dp "$NGPU" --save "$OUT_DIR/ckpt"
run resume "$NGPU" --load "$OUT_DIR/ckpt" --train-iters 40
if [ "$NGPU" -ge 2 ]; then
  run tp2 2 --tensor-model-parallel-size 2 --train-iters 20
  run pp2_load 2 --pipeline-model-parallel-size 2 --load "$OUT_DIR/ckpt" --train-iters 40
fi
# GPU figures (one process, the current CUDA device)
echo "gpu_smoke: step-time overhead (plugin loss vs Megatron's plain loss)"
"$PYTHON" benchmarks/bench_step_overhead.py --json "$OUT_DIR/step_overhead.json"
echo "gpu_smoke: generation tokens/s, KV cache vs recompute"
"$PYTHON" benchmarks/bench_generation.py --rows 256 --json "$OUT_DIR/generation.json"
if [ "$NGPU" -ge 2 ]; then
  run cp2 2 --context-parallel-size 2 --train-iters 20
  run ep2 2 --expert-model-parallel-size 2 --num-experts 4 --train-iters 20
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 -m megatron_rl_agg.cli check-invariance \
    --layouts cp2 ep2 --num-experts 4
fi
echo "gpu_smoke: OK"
