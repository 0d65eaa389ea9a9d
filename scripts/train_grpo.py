"""Train a GPT policy with GRPO-family RL on Megatron-Core, with exact loss aggregation.

CPU, 2 processes (gloo; DP = 2 / (TP x PP x CP)), the built-in counting task, on-policy:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 scripts/train_grpo.py --config configs/cpu_demo.yaml

A recipe at another layout, with CLI overrides of the YAML:

    torchrun --nproc_per_node 2 scripts/train_grpo.py --config configs/dapo.yaml \\
        --tensor-model-parallel-size 2 --metrics-file runs/dapo/metrics.jsonl

Offline rollouts (one JSON object per line, see docs/training.md), resume, reference policy:

    torchrun --nproc_per_node 2 scripts/train_grpo.py --rollouts data.jsonl --global-batch-size 64 \\
        --loss-aggregation seq_mean_token_mean --save ckpt --save-interval 10
    torchrun --nproc_per_node 2 scripts/train_grpo.py ... --load ckpt --train-iters 40
    torchrun --nproc_per_node 2 scripts/train_grpo.py ... --kl-coef 0.01 --ref-load ckpt

Context parallelism and Megatron's 3-tuple loss contract (the same gradient as without it):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 scripts/train_grpo.py --config configs/cpu_demo.yaml \
        --context-parallel-size 2 --calculate-per-token-loss

GPU (NCCL, bf16, Transformer Engine layer spec when it imports): scripts/gpu_smoke.sh. Multi-node
rendezvous: scripts/launch.sh and docs/slurm_example.sbatch. Every flag: docs/training.md.
"""

import os
import sys


def main(argv=None) -> int:
    # Imports inside main(): checkpoint saving starts a helper process that re-imports this file, which
    # then stays cheap and side-effect free.
    from megatron_rl_agg.mcore.compat import destroy_distributed, quiet_warnings

    quiet_warnings()                    # before anything imports megatron.core
    from megatron_rl_agg.trainer.cli.arguments import parse_args
    from megatron_rl_agg.trainer.cli.validation import TrainerArgsError
    from megatron_rl_agg.trainer.loop.checkpoint import CheckpointError
    from megatron_rl_agg.trainer.rollout.rollouts import RolloutFormatError
    from megatron_rl_agg.trainer.loop.safety import DistributedTimeoutError, RewardFailureError
    from megatron_rl_agg.trainer.loop.train import run
    from megatron_rl_agg.trainer.step.nonfinite import NonFiniteError

    try:
        run(parse_args(argv))
    except (TrainerArgsError, RolloutFormatError, CheckpointError) as err:  # bad options, rows, checkpoints
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (NonFiniteError, RewardFailureError) as err:   # the run stopped before a bad update
        print(f"error: {err}", file=sys.stderr)
        return 1
    except DistributedTimeoutError as err:
        # A peer is stopped or gone: tearing the groups down could wait on it. Leave at once, without
        # running the groups' destructors (which could abort), after flushing the message.
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
