"""Command line of the GRPO trainer: Megatron-LM flag names, the plugin's flags, and YAML configs.

Precedence: built-in defaults < ``--config FILE.yaml`` < flags on the command line. A YAML file maps
option names (``global_batch_size`` or ``global-batch-size``) to values; an unknown key is an error
that lists the valid ones, so a typo never silently keeps a default.

Where Megatron-LM has a flag for the same thing the trainer uses its name (``--tensor-model-parallel-size``,
``--global-batch-size``, ``--lr``, ``--save``, ...); the RL loss and advantage flags come from
:func:`megatron_rl_agg.core.config.add_loss_aggregation_args`, and ``--sequence-packing`` from
:mod:`megatron_rl_agg.mcore.packing`. ``docs/training.md`` lists every flag.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import yaml

from megatron_rl_agg.core.config import AdvantageConfig, LossConfig, add_loss_aggregation_args
from megatron_rl_agg.core.routing import REPLAY_MODES
from megatron_rl_agg.trainer.cli import validation
from megatron_rl_agg.trainer.cli.hf_args import add_hf_args, validate_hf_args
from megatron_rl_agg.trainer.cli.validation import TrainerArgsError, check_positive_flags, positive_flag

# Megatron's MoE token dispatchers the trainer runs (mcore.spec.MOE_TOKEN_DISPATCHERS; mcore/spec.py imports
# torch at module level, this module must not need it to print --help).
MOE_TOKEN_DISPATCHERS = ("alltoall", "allgather")
# Who samples on-policy rollouts (megatron_rl_agg.trainer.rollout.sources / .engine_source).
ROLLOUT_ENGINES = ("megatron", "vllm")

__all__ = ["build_parser", "parse_args", "load_yaml_defaults", "validate_args", "check_world",
           "virtual_pipeline_size"]


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism (Megatron-LM names; DP = world size / (TP x PP x CP))")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="CP size: every row is split into 2 x CP zigzag chunks over CP ranks (--seq-length "
                        "a multiple of 2 x CP; the local spec uses the plugin's CP attention, the Transformer "
                        "Engine spec its own)")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="Megatron's calculate_per_token_loss: the loss returns (loss, num_tokens, report) and "
                        "Megatron divides the summed gradient by the total token count; the same gradient "
                        "as without it")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="layers per virtual pipeline stage (interleaved 1F1B); needs PP >= 2")
    g.add_argument("--micro-batch-size", type=int, default=4, help="rows per micro-batch")
    g.add_argument("--global-batch-size", type=int, default=64,
                   help="rows per optimizer step, all DP ranks together (before dropped samples; a step "
                        "with fewer rows is padded with fully masked rows)")
    g.add_argument("--mini-batches-per-step", type=int, default=1,
                   help="optimizer updates per training step: the step's rollouts (K x global batch size "
                        "rows) are split into K mini-batches of whole prompt groups, with the old log-probs "
                        "of all of them computed before the first update (PPO-style reuse)")
    g.add_argument("--ddp-average-in-collective", action="store_true",
                   help="Megatron DDP averages in the gradient collective instead of pre-scaling by 1/(DP x CP) "
                        "and summing (the same gradient; refused with --calculate-per-token-loss)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the optimizer state over DP ranks (Megatron's DistributedOptimizer)")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (a GPTModel trained from scratch)")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden size")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--seq-length", type=int, default=16,
                   help="positions per row; prompt + response must fit in seq-length + 1 tokens")
    g.add_argument("--vocab-size", type=int, default=32,
                   help="vocabulary size (a multiple of TP); the demo task needs >= 19")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and compute (GPU)")
    g.add_argument("--transformer-impl", choices=("auto", "local", "transformer_engine"), default="auto",
                   help="layer spec: Transformer Engine when it imports on a GPU (auto), or Megatron's "
                        "local modules")


def _add_moe_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mixture of experts (Megatron-LM names; EP splits the DP ranks)")
    g.add_argument("--num-experts", type=int, default=None,
                   help="experts per MoE layer: every MLP becomes a Megatron MoELayer (default: dense)")
    g.add_argument("--moe-router-topk", type=int, default=2, help="experts each token is routed to")
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="EP size: each EP rank holds num-experts / EP experts; must divide DP")
    g.add_argument("--moe-token-dispatcher-type", choices=MOE_TOKEN_DISPATCHERS, default="allgather",
                   help="how routed tokens reach the experts of other EP ranks")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0,
                   help="coefficient of the load-balancing aux loss (0: off); the metric "
                        "load_balancing_loss is reported without it")
    g.add_argument("--moe-routing-replay", choices=list(REPLAY_MODES), default="off",
                   help="MoE routing replay: r2 records the routes of the old log-prob forward (before the "
                        "update) and replays them in every micro-batch of the update; r3 (the rollout "
                        "engine's routes) is not wired yet (docs/routing_replay.md)")
    g.add_argument("--disable-bias-linear", action="store_true",
                   help="no biases in the linear layers (needed with --num-experts on the local spec)")


def _add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer and schedule")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (constant)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.99)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global grad-norm clip (0: off)")
    g.add_argument("--train-iters", type=int, default=100, help="optimizer steps to run (in total)")
    g.add_argument("--seed", type=int, default=1234,
                   help="initial weights, prompts, sampling and rollout failures derive from it")


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoints (dist_checkpointing; any layout loads any other)")
    g.add_argument("--save", default=None, help="directory to save checkpoints to")
    g.add_argument("--load", default=None,
                   help="directory to resume from (its latest checkpoint: model, optimizer, step, RNG)")
    g.add_argument("--save-interval", type=int, default=None,
                   help="save every N steps (and after the last step); default: only after the last")
    g.add_argument("--ref-load", default=None,
                   help="checkpoint directory holding the frozen reference policy for --kl-coef > 0 "
                        "(default: the initial weights of --seed)")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("rollouts")
    g.add_argument("--rollouts", default=None,
                   help="offline JSONL rollout file; without it rollouts are generated on-policy by the "
                        "model on the built-in counting task")
    g.add_argument("--recompute-logprobs", action="store_true",
                   help="recompute the proximal (old) log-probs with the model before the step's first update "
                        "and use the file's 'logprobs' as the behaviour log-probs of the off-policy correction "
                        "(--is-level; docs/off_policy.md); needs --rollouts with 'logprobs' (or --rollout-engine vllm: "
                        "the engine's log-probs are the behaviour ones)")
    g.add_argument("--max-staleness", type=int, default=None,
                   help="loss tokens whose staleness (k - 1) - version at step k exceeds this (the file's "
                        "'versions') are dropped or masked (--staleness-mode; docs/off_policy.md); needs "
                        "rollouts with 'versions'; default: no limit")
    g.add_argument("--staleness-mode", choices=("drop", "mask"), default="drop",
                   help="stale tokens (--max-staleness): drop = out of the loss and of every aggregation "
                        "denominator; mask = advantage 0 (no policy gradient), still counted in the denominators")
    g.add_argument("--num-samples-per-prompt", type=int, default=8, help="on-policy group size n")
    g.add_argument("--max-new-tokens", type=int, default=8,
                   help="on-policy generation limit; longer responses are truncated (finish 'length')")
    g.add_argument("--rollout-failure-prob", type=float, default=0.0,
                   help="drop each on-policy sample with this probability (partial groups, as a rollout "
                        "service that loses samples)")
    g.add_argument("--task-min-count", type=int, default=2, help="counting task: smallest count n")
    g.add_argument("--task-max-count", type=int, default=5, help="counting task: largest count n")
    g.add_argument("--task-max-distractors", type=int, default=2,
                   help="counting task: up to this many distractor digits per prompt")


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("inference engine (docs/engine.md)")
    g.add_argument("--rollout-engine", default="megatron", choices=ROLLOUT_ENGINES,
                   help="who samples on-policy rollouts: the Megatron model itself, or a vLLM server (needs "
                        "--hf-checkpoint and --prompt-data; weights synced after every step)")
    g.add_argument("--vllm-url", default=None,
                   help="attach to running vLLM servers (http://host:port[,http://host:port...]; prompts "
                        "split across them; started with VLLM_SERVER_DEV_MODE=1); without it the trainer "
                        "launches one itself")
    g.add_argument("--vllm-python", default=None,
                   help="Python of the vLLM environment for the server the trainer launches (default: "
                        ".venv-vllm/bin/python of this repository, built by scripts/setup_vllm.sh)")
    g.add_argument("--vllm-args", default="",
                   help="extra arguments of the launched server, one shell-quoted string (e.g. "
                        "\"--max-num-seqs 64 --tensor-parallel-size 2\")")
    g.add_argument("--vllm-processed-logprobs", action="store_true",
                   help="the --vllm-url servers run with --logprobs-mode processed_logprobs (log-probs after "
                        "temperature scaling), so --temperature other than 1 is allowed with them; the server "
                        "the trainer launches always does")
    g.add_argument("--vllm-timeout", type=float, default=300.0,
                   help="seconds the launched server may take to become healthy, and any one HTTP call to "
                        "the engine may take; past it the run stops naming the URL (below "
                        "--distributed-timeout-minutes, which bounds the other ranks' wait)")
    g.add_argument("--sync-dir", default=None,
                   help="directory the weights are exported to for the engine after every step (default: a "
                        "fresh directory under /dev/shm, removed at the end)")
    g.add_argument("--verify-sync", action="store_true",
                   help="after every sync, check that the engine's log-probs of a probe sequence equal the "
                        "model's (within --verify-sync-tol); stop the run otherwise")
    g.add_argument("--verify-sync-tol", type=float, default=1e-4,
                   help="largest absolute log-prob difference --verify-sync accepts (fp32; raise it for bf16)")
    g.add_argument("--async-rollouts", type=int, default=0, choices=(0, 1),
                   help="1: request step k+1's rollouts while step k trains (one step off-policy, "
                        "staleness 1 from step 2); 0: synchronous")


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--metrics-file", default=None, help="JSON lines, one per optimizer step (rank 0)")
    g.add_argument("--tensorboard-dir", default=None,
                   help="TensorBoard event directory (written when torch.utils.tensorboard imports)")
    g.add_argument("--no-progress-bar", action="store_true", help="disable the tqdm bar on rank 0")


def _add_reliability_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("reliability (docs/reliability.md)")
    g.add_argument("--on-nonfinite", choices=("error", "skip"), default="error",
                   help="a non-finite loss or gradient before an optimizer update: stop the run with an "
                        "error naming the step and the term (error), or skip that update and count it in "
                        "the metrics (num_skipped_updates); the weights never see it either way")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="Megatron-LM's flag: a collective that waits longer (a rank stopped or dead) ends "
                        "the run with an error naming the ranks that did not answer")
    g.add_argument("--load-fallback", action="store_true",
                   help="when the latest checkpoint of --load is incomplete or corrupt, resume from the "
                        "newest complete one before it (default: stop with an error)")
    g.add_argument("--save-on-interrupt", action=argparse.BooleanOptionalAction, default=True,
                   help="on SIGINT / SIGTERM finish the current step, save it to --save (when given) and "
                        "exit cleanly; a second signal abandons the step at once")


def build_parser() -> argparse.ArgumentParser:
    """The full parser (every option has a default, so a YAML file can supply any of them)."""
    parser = argparse.ArgumentParser(
        description="GRPO-family RL on Megatron-Core with exact loss aggregation (megatron_rl_agg)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of option defaults (CLI overrides it)")
    for add in (_add_parallel_args, _add_model_args, _add_moe_args, _add_optimizer_args, _add_checkpoint_args,
                _add_data_args, _add_engine_args, _add_logging_args):
        add(parser)
    add_hf_args(parser)
    add_loss_aggregation_args(parser)
    _add_reliability_args(parser)
    from megatron_rl_agg.mcore.packing import add_sequence_packing_args
    add_sequence_packing_args(parser)
    return parser


def load_yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """Read ``path`` and return ``{dest: value}`` for ``parser.set_defaults``.

    Raises:
        TrainerArgsError: not a mapping, or a key that is no option (message lists the valid keys).
    """
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise TrainerArgsError(f"{path}: a config file must be a mapping of option names to values")
    dests = {a.dest for a in parser._actions if a.dest not in ("help", "config")}
    out, written, unknown = {}, {}, []
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest in dests:
            out[dest], written[dest] = value, key
        else:
            unknown.append(key)
    if unknown:
        valid = ", ".join(sorted(d.replace("_", "-") for d in dests))
        raise TrainerArgsError(f"{path}: unknown option(s) {unknown}; valid: {valid}")
    for action in parser._actions:
        # YAML values pass the option's own type / choices check, stricter than a command-line string;
        # errors name the key as the file writes it (use-distributed-optimizer or use_distributed_optimizer).
        if action.dest in out:
            out[action.dest] = validation.yaml_value(path, action, written[action.dest], out[action.dest])
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) with YAML defaults from ``--config``, then validate."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_yaml_defaults(parser, pre.config))
    args = parser.parse_args(argv)
    validate_args(args, parser)
    return args


def validate_args(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> None:
    """Checks that need no process group; fills ``max_response_length`` for on-policy runs.

    On-policy runs default ``--max-response-length`` (the constant horizon of seq_mean_token_sum_norm)
    to ``--max-new-tokens``, the longest response generation can produce. Number flags and model shapes
    are checked by :mod:`.validation` (``parser``: the one that parsed ``args``, default
    :func:`build_parser`).
    """
    validate_hf_args(args)     # --hf-checkpoint sets the size flags from config.json
    validation.check_number_flags(parser or build_parser(), args)
    check_positive_flags(args, "tensor_model_parallel_size", "pipeline_model_parallel_size",
                         "micro_batch_size", "global_batch_size", "mini_batches_per_step", "num_layers",
                         "hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                         "num_samples_per_prompt", "max_new_tokens")
    if not (args.train_iters == 0 and args.save_hf):
        positive_flag(args.train_iters, "--train-iters",
                      "a positive integer (0 only with --save-hf, to convert without training)")
    if args.rollouts is None:
        if args.global_batch_size % args.num_samples_per_prompt:
            raise TrainerArgsError(
                f"--global-batch-size {args.global_batch_size} must be a multiple of "
                f"--num-samples-per-prompt {args.num_samples_per_prompt} (whole prompt groups per step)")
        if not 0.0 <= args.rollout_failure_prob < 1.0:
            raise TrainerArgsError(
                f"--rollout-failure-prob must be in [0, 1), got {args.rollout_failure_prob}")
        if args.max_response_length is None:
            args.max_response_length = args.max_new_tokens
    validation.check_model_shapes(args)
    check_positive_flags(args, "context_parallel_size")
    cp = args.context_parallel_size
    if cp > 1 and args.seq_length % (2 * cp):
        raise TrainerArgsError(
            f"--seq-length {args.seq_length} must be a multiple of 2 x --context-parallel-size = {2 * cp} "
            f"(context parallelism splits every row into 2 x CP equal chunks), e.g. --seq-length "
            f"{-(-args.seq_length // (2 * cp)) * 2 * cp}")
    if cp > 1 and getattr(args, "sequence_packing", False):
        raise TrainerArgsError(
            "--sequence-packing is not supported with --context-parallel-size > 1 (packed THD sequences "
            "under context parallelism): drop --sequence-packing (padded rows give the same loss and "
            "gradients), or use --context-parallel-size 1")
    if args.calculate_per_token_loss and args.ddp_average_in_collective:
        raise TrainerArgsError(
            "--calculate-per-token-loss cannot be combined with --ddp-average-in-collective: under the flag "
            "the gradient is summed over the dp x cp ranks and divided once by the total token count, and "
            "averaging in the collective would divide it by dp x cp as well; drop one of the two flags")
    if args.vocab_size % args.tensor_model_parallel_size:
        raise TrainerArgsError(f"--vocab-size {args.vocab_size} must be a multiple of "
                               f"--tensor-model-parallel-size {args.tensor_model_parallel_size}")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_stage, pp = args.num_layers_per_virtual_pipeline_stage, args.pipeline_model_parallel_size
        stages = pp * per_stage if per_stage > 0 else 0
        if pp < 2 or stages <= 0 or args.num_layers % stages or args.num_layers == stages:
            raise TrainerArgsError(
                f"--num-layers-per-virtual-pipeline-stage {per_stage} needs PP >= 2 and --num-layers "
                f"{args.num_layers} a multiple of PP x it with at least 2 virtual stages (PP = {pp})")
    elif args.num_layers % args.pipeline_model_parallel_size:
        raise TrainerArgsError(f"--num-layers {args.num_layers} must be a multiple of "
                               f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}")
    _validate_moe(args)
    if args.save_interval is not None:
        positive_flag(args.save_interval, "--save-interval", "positive")
    _validate_engine(args)
    if args.recompute_logprobs and args.rollouts is None and args.rollout_engine == "megatron":
        raise TrainerArgsError("--recompute-logprobs needs --rollouts with 'logprobs' (the behaviour log-probs "
                               "of the engine that sampled); on-policy rollouts are sampled by the model itself")
    if getattr(args, "is_level", "off") != "off" and not args.recompute_logprobs:
        raise TrainerArgsError(f"--is-level {args.is_level} needs --recompute-logprobs (the proximal log-probs "
                               "recomputed by the model, the file's 'logprobs' as behaviour); or --is-level off")
    if args.max_staleness is not None and (isinstance(args.max_staleness, bool) or args.max_staleness < 0):
        raise TrainerArgsError(f"--max-staleness must be an integer >= 0 (0: on-policy tokens only), got "
                               f"{args.max_staleness!r}")
    if args.max_staleness is not None and args.rollouts is None and args.rollout_engine != "vllm":
        raise TrainerArgsError(f"--max-staleness {args.max_staleness} needs --rollouts with 'versions' (the "
                               "policy version of each token) or --rollout-engine vllm (its rows record the "
                               "engine's version); on-policy rows are sampled by the current weights")
    if args.staleness_mode == "mask" and args.max_staleness is None:
        raise TrainerArgsError("--staleness-mode mask needs --max-staleness K (the staleness above which tokens "
                               "are masked)")
    if args.ref_load is not None and args.kl_coef == 0:
        raise TrainerArgsError("--ref-load is only used with --kl-coef > 0")
    try:  # the dataclasses own the loss/advantage checks; run them now so errors come before startup
        LossConfig.from_args(args)
        AdvantageConfig.from_args(args)
    except ValueError as err:
        raise TrainerArgsError(str(err)) from None


def _logprobs_mode(vllm_args: str):
    """The ``--logprobs-mode`` value in ``--vllm-args`` (None when absent)."""
    import shlex

    words = shlex.split(vllm_args or "")
    for i, word in enumerate(words):
        if word.startswith("--logprobs-mode="):
            return word.split("=", 1)[1]
        if word == "--logprobs-mode" and i + 1 < len(words):
            return words[i + 1]
    return None


def _validate_engine(args: argparse.Namespace) -> None:
    """``--rollout-engine vllm`` and its flags (before any process group; the URLs are parsed here)."""
    engine_flags = [f for f, v in (("--vllm-url", args.vllm_url), ("--vllm-python", args.vllm_python),
                                   ("--vllm-processed-logprobs", args.vllm_processed_logprobs),
                                   ("--sync-dir", args.sync_dir), ("--verify-sync", args.verify_sync),
                                   ("--async-rollouts", args.async_rollouts)) if v]
    if args.rollout_engine not in ROLLOUT_ENGINES:
        raise TrainerArgsError(f"--rollout-engine {args.rollout_engine!r}; valid: {list(ROLLOUT_ENGINES)}")
    if args.rollout_engine == "megatron":
        if engine_flags:
            raise TrainerArgsError(f"{', '.join(engine_flags)} need --rollout-engine vllm (the Megatron "
                                   "generator samples with the model itself)")
        return
    if not (args.hf_checkpoint and args.prompt_data):
        raise TrainerArgsError("--rollout-engine vllm needs --hf-checkpoint (the model the engine serves and "
                               "the weights it reloads) and --prompt-data (text prompts)")
    if args.vllm_url and args.vllm_python:
        raise TrainerArgsError("--vllm-url attaches to running servers; --vllm-python launches one: give one")
    if args.vllm_url:
        from megatron_rl_agg.engine.client import EngineError, parse_urls

        try:
            parse_urls(args.vllm_url)
        except EngineError as err:
            raise TrainerArgsError(str(err)) from None
    if not args.vllm_timeout > 0:
        raise TrainerArgsError(f"--vllm-timeout must be > 0 seconds, got {args.vllm_timeout}")
    if args.vllm_timeout >= 60 * args.distributed_timeout_minutes:
        raise TrainerArgsError(
            f"--vllm-timeout {args.vllm_timeout:g} s must be below --distributed-timeout-minutes "
            f"{args.distributed_timeout_minutes:g} (= {60 * args.distributed_timeout_minutes:g} s): the other ranks "
            "wait for rank 0's engine calls that long, and must hear the engine's error, naming its URL, first")
    if not args.verify_sync_tol > 0:
        raise TrainerArgsError(f"--verify-sync-tol must be > 0, got {args.verify_sync_tol}")
    if args.vllm_processed_logprobs and not args.vllm_url:
        raise TrainerArgsError("--vllm-processed-logprobs describes --vllm-url servers; the server the trainer "
                               "launches always runs with --logprobs-mode processed_logprobs")
    mode = _logprobs_mode(args.vllm_args)
    if args.temperature != 1.0 and args.vllm_url and not args.vllm_processed_logprobs:
        raise TrainerArgsError(
            f"--rollout-engine vllm with --temperature {args.temperature:g} and --vllm-url: vLLM reports the "
            "log-probs of the raw logits (temperature 1) unless the server runs with --logprobs-mode "
            "processed_logprobs; start it so and pass --vllm-processed-logprobs, or use --temperature 1")
    if args.temperature != 1.0 and not args.vllm_url and mode not in (None, "processed_logprobs"):
        raise TrainerArgsError(
            f"--vllm-args sets --logprobs-mode {mode}: with --temperature {args.temperature:g} the behaviour "
            "log-probs must be processed_logprobs (after temperature scaling); drop it or use --temperature 1")
    if args.async_rollouts not in (0, 1):
        raise TrainerArgsError(f"--async-rollouts {args.async_rollouts}; valid: 0, 1")


def _validate_moe(args: argparse.Namespace) -> None:
    """MoE flags that cannot work, before any process starts (the world-size rule: :func:`check_world`)."""
    check_positive_flags(args, "expert_model_parallel_size")
    ep, experts = args.expert_model_parallel_size, args.num_experts
    replay = getattr(args, "moe_routing_replay", "off")
    if replay != "off" and experts is None:
        raise TrainerArgsError(f"--moe-routing-replay {replay} needs --num-experts (a dense model has no router)")
    if replay == "r3" and args.rollouts is None:
        raise TrainerArgsError("--moe-routing-replay r3 replays the routes of an offline --rollouts file (its "
                               "'routes' key); on-policy rollouts do not record routes yet (the Megatron "
                               "generator and vLLM engine routes are not wired); use r2 or off")
    if args.moe_aux_loss_coeff < 0:
        raise TrainerArgsError(f"--moe-aux-loss-coeff must be >= 0, got {args.moe_aux_loss_coeff}")
    if experts is None:
        if ep > 1:
            raise TrainerArgsError(f"--expert-model-parallel-size {ep} needs an MoE model: set --num-experts")
        return
    positive_flag(experts, "--num-experts")
    if experts % ep:
        raise TrainerArgsError(f"--num-experts {experts} is not divisible by --expert-model-parallel-size {ep} "
                               "(each EP rank holds num-experts / EP whole experts)")
    if not 1 <= args.moe_router_topk <= experts:
        raise TrainerArgsError(f"--moe-router-topk {args.moe_router_topk} must be between 1 and "
                               f"--num-experts {experts}")
    if not args.disable_bias_linear and args.transformer_impl != "transformer_engine":
        raise TrainerArgsError(
            "--num-experts with linear biases on the local spec: megatron-core's expert MLP adds its bias "
            "in place on an autograd view and fails in the backward pass; add --disable-bias-linear")
    tp = args.tensor_model_parallel_size
    if tp > 1 and args.seq_length % tp:
        raise TrainerArgsError(f"--seq-length {args.seq_length} must be a multiple of --tensor-model-parallel-size "
                               f"{tp} with --num-experts: MoE layers at TP > 1 run sequence parallel")
    if args.context_parallel_size > 1:
        raise TrainerArgsError("--num-experts with --context-parallel-size > 1 is not supported: MoE layers "
                               "under context parallelism (aux-loss statistics over CP shards) are not tested "
                               "here; use --context-parallel-size 1 with MoE")
    if args.sequence_packing:
        raise TrainerArgsError("--sequence-packing with --num-experts is not supported: packed (THD) "
                               "micro-batches through MoE layers are not tested here; drop one of the two")


def check_world(args: argparse.Namespace, world_size: int) -> None:
    """Megatron's layout rules for ``world_size`` processes: TP x PP x CP divides the world (DP = world /
    (TP x PP x CP)), and, with expert tensor parallelism = TP, TP x EP x PP divides it too (EP divides
    DP x CP)."""
    tp, pp, cp, ep = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                      args.context_parallel_size, args.expert_model_parallel_size)
    if world_size % (tp * pp * cp):
        raise TrainerArgsError(f"world size {world_size} is not a multiple of TP x PP x CP = {tp} x {pp} x {cp}")
    dp = world_size // (tp * pp * cp)
    if (dp * cp) % ep:
        raise TrainerArgsError(
            f"--expert-model-parallel-size {ep} must divide DP x CP = {dp * cp} (DP = world {world_size} / "
            f"(TP {tp} x PP {pp} x CP {cp})): Megatron places experts on tp x ep x pp x expert-dp = world ranks")


def virtual_pipeline_size(args: argparse.Namespace) -> Optional[int]:
    """Virtual stages per pipeline rank, or None without interleaving."""
    if args.num_layers_per_virtual_pipeline_stage is None:
        return None
    return args.num_layers // (args.pipeline_model_parallel_size * args.num_layers_per_virtual_pipeline_stage)
