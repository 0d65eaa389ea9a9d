"""Per-step metrics: JSON lines, TensorBoard events (when importable) and a tqdm bar, all on rank 0."""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Optional

__all__ = ["MetricsLogger", "METRIC_KEYS"]

# Keys every metrics line carries (the trainer may add more). Documented in docs/training.md.
METRIC_KEYS = (
    "step", "policy_loss", "kl_loss", "entropy", "entropy_loss", "loss", "grad_norm", "clip_frac", "masked_frac",
    "ppo_kl",
    "reward_mean", "response_length", "num_rows", "num_groups", "num_partial_groups", "num_dropped_groups",
    "num_failed_samples", "num_truncated", "num_tokens", "lr", "step_time_s",
)


class MetricsLogger:
    """Writes one JSON object per step to ``metrics_file`` and TensorBoard; shows a tqdm bar.

    Only the process with ``enabled=True`` (global rank 0) writes anything. A resumed run appends to the
    existing metrics file; a fresh run truncates it.
    """

    def __init__(self, *, enabled: bool, metrics_file: Optional[str], tensorboard_dir: Optional[str],
                 total_steps: int, start_step: int, resume: bool, progress_bar: bool):
        self.enabled = enabled
        self._file = self._writer = self._bar = None
        if not enabled:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self._file = open(metrics_file, "a" if resume else "w", encoding="utf-8")
        if tensorboard_dir:
            self._writer = _tensorboard_writer(tensorboard_dir)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="grpo", dynamic_ncols=True)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(json.dumps(metrics, sort_keys=False) + "\n")
            self._file.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"train/{key}", value, metrics["step"])
            self._writer.flush()
        if self._bar is not None:
            self._bar.update(1)
            # Figures that move: the policy loss of a group-normalized objective is ~0 by construction.
            self._bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl_loss']:.2e}",
                                  grad_norm=f"{metrics['grad_norm']:.3g}",
                                  entropy=f"{metrics['entropy']:.3f}")

    def close(self) -> None:
        for obj in (self._file, self._writer, self._bar):
            if obj is not None:
                obj.close()


def _tensorboard_writer(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # tensorboard is an optional extra
        warnings.warn(f"--tensorboard-dir {log_dir} ignored: torch.utils.tensorboard does not import ({err})")
        return None
    return SummaryWriter(log_dir=log_dir)
