#!/usr/bin/env bash
# Launch scripts/train_grpo.py with torchrun on one node or many.
#
#   bash scripts/launch.sh [LAUNCHER OPTIONS] [TRAINER FLAGS]
#
# Launcher options come first (the first other argument starts the trainer flags); each one can also be
# set by its environment variable, the option winning:
#   --nnodes N          NNODES          number of nodes (default 1)
#   --node-rank R       NODE_RANK       this node's rank, 0 .. N-1 (default 0; checked, but under c10d the
#                                       rendezvous assigns the ranks: node rank = order of arrival)
#   --nproc-per-node P  NPROC_PER_NODE  processes on this node (default 2)
#   --master-addr A     MASTER_ADDR     address of node 0, the rendezvous endpoint (default 127.0.0.1)
#   --master-port P     MASTER_PORT     its port (default 29500)
#   --rdzv-backend B    RDZV_BACKEND    c10d (default with several nodes: torchrun's dynamic rendezvous,
#                                       a TCP store at MASTER_ADDR:MASTER_PORT) or static (default on
#                                       one node: MASTER_ADDR / MASTER_PORT / NODE_RANK as given)
#   --rdzv-id ID        RDZV_ID         the run's id, the same on every node (default SLURM_JOB_ID, else
#                                       megatron_rl_agg)
#
# One node, 8 processes:
#   bash scripts/launch.sh --nproc-per-node 8 --config configs/dapo.yaml --tensor-model-parallel-size 2
# Two nodes (run on each node; node 0 is the one whose address is --master-addr):
#   bash scripts/launch.sh --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --nproc-per-node 8 --config ...
#   bash scripts/launch.sh --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --nproc-per-node 8 --config ...
# (tests/trainer/test_trainer_layouts.py runs the two-node form on one machine: 127.0.0.1, gloo.)
#
# Every other argument is passed to the trainer (docs/training.md). DP = world size / (TP x PP x CP) with
# world size = nnodes x nproc-per-node. Backend: NCCL when CUDA is available, gloo otherwise.
# PYTHON selects the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_BACKEND=${RDZV_BACKEND:-}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-megatron_rl_agg}}

usage_error() {
  echo "launch.sh: $1" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes|--node-rank|--nproc-per-node|--master-addr|--master-port|--rdzv-backend|--rdzv-id)
      [ $# -ge 2 ] || usage_error "$1 needs a value"
      case "$1" in
        --nnodes) NNODES=$2 ;;
        --node-rank) NODE_RANK=$2 ;;
        --nproc-per-node) NPROC_PER_NODE=$2 ;;
        --master-addr) MASTER_ADDR=$2 ;;
        --master-port) MASTER_PORT=$2 ;;
        --rdzv-backend) RDZV_BACKEND=$2 ;;
        --rdzv-id) RDZV_ID=$2 ;;
      esac
      shift 2 ;;
    *) break ;;
  esac
done

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_int "$NNODES" && [ "$NNODES" -ge 1 ] || usage_error "--nnodes must be a positive integer, got '$NNODES'"
is_int "$NPROC_PER_NODE" && [ "$NPROC_PER_NODE" -ge 1 ] \
  || usage_error "--nproc-per-node must be a positive integer, got '$NPROC_PER_NODE'"
is_int "$NODE_RANK" && [ "$NODE_RANK" -lt "$NNODES" ] \
  || usage_error "--node-rank must be an integer in [0, $NNODES) for --nnodes $NNODES, got '$NODE_RANK'"
is_int "$MASTER_PORT" && [ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ] \
  || usage_error "--master-port must be a port number (1-65535), got '$MASTER_PORT'"
if [ -z "$RDZV_BACKEND" ]; then
  if [ "$NNODES" -gt 1 ]; then RDZV_BACKEND=c10d; else RDZV_BACKEND=static; fi
fi
case "$RDZV_BACKEND" in
  c10d) RDZV=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID") ;;
  static) RDZV=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT") ;;
  *) usage_error "--rdzv-backend must be one of: c10d, static; got '$RDZV_BACKEND'" ;;
esac

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" "${RDZV[@]}" \
  scripts/train_grpo.py "$@"
