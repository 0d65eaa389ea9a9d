#!/usr/bin/env bash
# Launch scripts/train_grpo.py with torchrun on one node or many (static rendezvous).
#
# One node, 8 processes:
#   NPROC_PER_NODE=8 bash scripts/launch.sh --config configs/dapo.yaml --tensor-model-parallel-size 2
# Two nodes (run on each node; NODE_RANK 0 on the node whose address is MASTER_ADDR):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 bash scripts/launch.sh --config ...
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 bash scripts/launch.sh --config ...
#
# Every argument is passed to the trainer (docs/training.md). DP = world size / (TP x PP x CP) with
# world size = NNODES x NPROC_PER_NODE. Backend: NCCL when CUDA is available, gloo otherwise.
# PYTHON selects the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  scripts/train_grpo.py "$@"
