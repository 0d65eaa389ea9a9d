"""Command line of megatron_rl_agg (console script ``megatron-rl-agg``).

    megatron-rl-agg check-invariance                              # default layouts, every mode
    megatron-rl-agg check-invariance --layouts "m4 dp2+m2 tp2" --modes token_mean prompt_mean
    megatron-rl-agg check-invariance --inject-bug local_token_count   # self-test: must print FAIL rows
    torchrun --nproc-per-node 2 -m megatron_rl_agg.cli check-invariance --layouts "dp2+m2 pp2vpp2m4"
    megatron-rl-agg export-hf --hf-checkpoint models/Qwen2.5-0.5B --load runs/grpo/ckpt --out runs/grpo/hf

Outside torchrun the command re-launches itself under torchrun, once per process count its layouts need;
under torchrun with world size W it runs the layouts that need exactly W processes. See docs/audit.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from megatron_rl_agg.audit.cli import add_audit_args

    parser = argparse.ArgumentParser(prog="megatron-rl-agg", description="megatron_rl_agg tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    audit = commands.add_parser(
        "check-invariance", help="compare gradients across parallel layouts with a single-process reference",
        description="One forward-backward of a real Megatron-Core GPT model per layout and mode; prints the "
                    "max relative gradient difference against a single-process reference and PASS/FAIL. "
                    "Exit status 0: all PASS, 1: any FAIL, 2: bad arguments or nothing ran.")
    add_audit_args(audit)
    from megatron_rl_agg.trainer.cli.hf_args import add_export_args

    export = commands.add_parser(
        "export-hf", help="convert a trainer checkpoint into a Hugging Face model directory",
        description="Load a trainer checkpoint (dist_checkpointing, saved at any layout) into the architecture "
                    "of the Hugging Face directory the run started from and write safetensors, config.json, "
                    "generation_config.json and the tokenizer files to --out (atomically). Needs the 'hf' extra.")
    add_export_args(export)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_rl_agg.mcore.compat import destroy_distributed, quiet_warnings

    quiet_warnings()
    args = build_parser().parse_args(argv)
    if args.command == "check-invariance":
        from megatron_rl_agg.audit.cli import check_invariance

        try:
            return check_invariance(args)
        finally:
            destroy_distributed()       # a worker never exits with a live process group
    if args.command == "export-hf":
        from megatron_rl_agg.trainer.loop.hf_model import export_checkpoint

        return export_checkpoint(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
