#!/usr/bin/env bash
# CPU demo: on-policy GRPO on the built-in counting task with 2 processes (gloo), then a reward plot.
#
#   bash scripts/run_cpu_demo.sh                       # set up .venv if needed, train, plot
#   bash scripts/run_cpu_demo.sh --train-iters 150     # extra flags go to scripts/train_grpo.py
#   SKIP_SETUP=1 OUT_DIR=/tmp/demo bash scripts/run_cpu_demo.sh
#   VENV=.venv-mcore-0.19.2 SKIP_SETUP=1 bash scripts/run_cpu_demo.sh   # another environment
#
# Setup on a fresh machine: creates .venv with python3.11 (PYTHON=... to choose another) and installs
# torch==2.13.0 FIRST (CPU build), then this package, so that pip never resolves a CUDA build of torch.
# Output: $OUT_DIR/metrics.jsonl (one line per step), $OUT_DIR/tb (TensorBoard), $OUT_DIR/curves.png.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN=${PYTHON:-python3.11}
OUT_DIR=${OUT_DIR:-runs/cpu_demo}
VENV=${VENV:-.venv}
if [ "${SKIP_SETUP:-0}" != "1" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON_BIN" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[plot,tensorboard]"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT_DIR"
"$VENV/bin/python" -m torch.distributed.run --standalone --nproc_per_node 2 scripts/train_grpo.py \
  --config configs/cpu_demo.yaml --metrics-file "$OUT_DIR/metrics.jsonl" --tensorboard-dir "$OUT_DIR/tb" "$@"
if "$VENV/bin/python" -c "import matplotlib" 2>/dev/null; then
  "$VENV/bin/python" scripts/plot_metrics.py "$OUT_DIR/metrics.jsonl" --labels cpu_demo --smooth 10 \
    --out "$OUT_DIR/curves.png"
fi
"$VENV/bin/python" - "$OUT_DIR/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
k = max(1, min(10, len(rows) // 4))
first = sum(r["reward_mean"] for r in rows[:k]) / k
last = sum(r["reward_mean"] for r in rows[-k:]) / k
print(f"mean reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f} ({len(rows)} steps)")
PY
