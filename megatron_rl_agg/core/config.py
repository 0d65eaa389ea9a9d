"""Configuration of the plugin: one dataclass per concern, validated, and the argparse flags built from
them (usable as Megatron-LM's ``extra_args_provider``).

    from megatron_rl_agg.core.config import add_loss_aggregation_args, LossConfig, AdvantageConfig
    parser = add_loss_aggregation_args(argparse.ArgumentParser())
    args = parser.parse_args(["--loss-aggregation", "seq-mean-token-sum-norm", "--max-response-length", "512"])
    loss_cfg, adv_cfg = LossConfig.from_args(args), AdvantageConfig.from_args(args)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_rl_agg.core.aggregation import LOSS_AGGREGATIONS, get_aggregation, resolve_aggregation
from megatron_rl_agg.core.corrections import IS_DENOMINATORS, IS_LEVELS, IS_MODES, check_is_settings
from megatron_rl_agg.core.validate import positive_int

__all__ = [
    "LossConfig",
    "AdvantageConfig",
    "KL_ESTIMATORS",
    "TERM_AGGREGATIONS",
    "ADV_ESTIMATORS",
    "NORM_LEVELS",
    "OVERLONG_POLICIES",
    "MICROBATCH_MEAN",
    "resolve_term_aggregation",
    "add_loss_aggregation_args",
]

KL_ESTIMATORS = ("k1", "k2", "k3")
MICROBATCH_MEAN = "microbatch_mean"
TERM_AGGREGATIONS = (MICROBATCH_MEAN,) + tuple(n for n in LOSS_AGGREGATIONS if n != "token_mean_legacy")
ADV_ESTIMATORS = ("grpo", "rloo", "dr_grpo")
NORM_LEVELS = ("group", "batch", "none")
OVERLONG_POLICIES = ("keep", "zero_advantage", "mask")

# (mean_level, std_level, leave_one_out) implied by each estimator unless overridden.
_ESTIMATOR_DEFAULTS = {
    "grpo": ("group", "group", False),     # (r - mean_g) / (std_g + eps)
    "rloo": ("group", "none", True),       # r - mean of the other valid rows of the group
    "dr_grpo": ("group", "none", False),   # r - mean_g (Dr. GRPO drops the std division)
}


def _choice(value, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _finite(value, what: str, *, low: float, low_open: bool = False, high: float = math.inf,
            high_open: bool = True) -> float:
    """``value`` as a float when it is a finite real number in the given range, else a ValueError naming
    it (NaN fails every comparison, so a bare ``value < 0`` would let it through)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a finite number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not above:
        raise ValueError(f"{what} must be {'>' if low_open else '>='} {low:g}"
                         f"{'' if high == math.inf else ' and < ' + format(high, 'g')}, got {value!r}")
    if not below:
        raise ValueError(f"{what} must be in {'(' if low_open else '['}{low:g}, {high:g}"
                         f"{')' if high_open else ']'}, got {value!r}")
    return float(value)


def resolve_term_aggregation(name: str, what: str = "kl/entropy aggregation") -> str:
    """``microbatch_mean`` or the canonical name of an exact global mode (aliases accepted)."""
    if isinstance(name, str) and name.strip().lower() in (MICROBATCH_MEAN, "microbatch-mean"):
        return MICROBATCH_MEAN
    try:
        canonical = resolve_aggregation(name)
    except ValueError:
        canonical = None
    if canonical is None or canonical == "token_mean_legacy":
        raise ValueError(f"{what} must be one of {', '.join(TERM_AGGREGATIONS)} (or an alias of a mode); "
                         f"got {name!r}")
    return canonical


@dataclass(kw_only=True)
class LossConfig:
    """The policy-gradient loss and its aggregation (see docs/aggregation.md)."""

    loss_aggregation: str = field(default="token_mean", metadata={
        "help": "aggregation of the policy-gradient term over the mini-batch: "
                + ", ".join(LOSS_AGGREGATIONS) + " (aliases accepted, e.g. seq_mean, seq-mean-token-sum-norm)"})
    max_response_length: Optional[int] = field(default=None, metadata={
        "help": "constant horizon L of seq_mean_token_sum_norm (Dr. GRPO); required by that mode"})
    kl_coef: float = field(default=0.0, metadata={"help": "coefficient of the KL term against the reference"})
    kl_estimator: str = field(default="k3", metadata={"help": "KL estimator", "choices": KL_ESTIMATORS})
    entropy_coef: float = field(default=0.0, metadata={"help": "coefficient of the entropy bonus"})
    kl_aggregation: str = field(default=MICROBATCH_MEAN, metadata={
        "help": "microbatch_mean (Megatron's averaging: kl_coef keeps its usual meaning) or a mode name for "
                "exact global aggregation"})
    entropy_aggregation: str = field(default=MICROBATCH_MEAN, metadata={
        "help": "microbatch_mean (default) or a mode name for exact global aggregation"})
    clip_eps_low: float = field(default=0.2, metadata={"help": "PPO ratio clip below: r >= 1 - eps_low"})
    clip_eps_high: float = field(default=0.2, metadata={
        "help": "PPO ratio clip above: r <= 1 + eps_high (DAPO clip-higher uses 0.28)"})
    dual_clip_c: Optional[float] = field(default=None, metadata={
        "help": "dual-clip constant c > 1 bounding the loss of negative-advantage tokens (off when unset)"})
    # Off-policy correction (docs/off_policy.md): weights pi_prox / pi_behave from batch['behaviour_logprobs'].
    is_level: str = field(default="off", metadata={
        "help": "importance weight between the proximal and the behaviour policy: off, token, sequence "
                "(product exp(sum)), geometric (exp(mean))", "choices": IS_LEVELS})
    is_mode: str = field(default="truncate", metadata={
        "help": "treatment of the weight: truncate (cap at --is-high), clip ([--is-low, --is-high]), mask "
                "(0 outside [--is-low, --is-high])", "choices": IS_MODES})
    is_low: float = field(default=0.0, metadata={"help": "lower IS bound (clip, mask)"})
    is_high: float = field(default=2.0, metadata={"help": "upper IS bound (truncate, clip, mask)"})
    is_veto: Optional[float] = field(default=None, metadata={
        "help": "v in (0, 1): reject a whole sequence when any token ratio is < v or > 1/v (off when unset)"})
    is_denominator: str = field(default="keep_count", metadata={
        "help": "zero-weight (masked / rejected) tokens: keep_count (still counted in the aggregation "
                "denominators) or survivors (removed from the loss mask first)", "choices": IS_DENOMINATORS})
    is_self_normalize: bool = field(default=False, metadata={
        "help": "divide the IS weights by their mean over the mini-batch's counted loss tokens"})

    def __post_init__(self) -> None:
        self.loss_aggregation = resolve_aggregation(self.loss_aggregation)
        self.kl_aggregation = resolve_term_aggregation(self.kl_aggregation, "kl_aggregation")
        self.entropy_aggregation = resolve_term_aggregation(self.entropy_aggregation, "entropy_aggregation")
        _choice(self.kl_estimator, KL_ESTIMATORS, "kl_estimator")
        for name in ("kl_coef", "entropy_coef", "clip_eps_high"):
            setattr(self, name, _finite(getattr(self, name), name, low=0.0))
        self.clip_eps_low = _finite(self.clip_eps_low, "clip_eps_low", low=0.0, high=1.0)
        if self.dual_clip_c is not None:
            self.dual_clip_c = _finite(self.dual_clip_c, "dual_clip_c", low=1.0, low_open=True)
        if self.max_response_length is not None:
            positive_int(self.max_response_length, "max_response_length")
        self.is_low = _finite(self.is_low, "is_low (--is-low)", low=0.0)
        self.is_high = _finite(self.is_high, "is_high (--is-high)", low=0.0, low_open=True)
        if self.is_veto is not None:
            self.is_veto = _finite(self.is_veto, "is_veto (--is-veto)", low=0.0, low_open=True, high=1.0)
        if not isinstance(self.is_self_normalize, bool):
            raise ValueError(f"is_self_normalize must be a bool, got {self.is_self_normalize!r}")
        check_is_settings(self.is_level, self.is_mode, self.is_low, self.is_high, self.is_veto,
                          self.is_denominator)
        for attr in ("loss_aggregation", "kl_aggregation", "entropy_aggregation"):
            mode = getattr(self, attr)
            if mode != MICROBATCH_MEAN and get_aggregation(mode).needs_max_response_length \
                    and self.max_response_length is None:
                raise ValueError(f"{attr}={mode!r} divides by the constant horizon L: set "
                                 "max_response_length (--max-response-length)")

    @property
    def needs_groups(self) -> bool:
        """True when any term is aggregated per prompt group (group ids must reach the loss)."""
        return any(m != MICROBATCH_MEAN and get_aggregation(m).needs_groups
                   for m in (self.loss_aggregation, self.kl_aggregation, self.entropy_aggregation))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LossConfig":
        return _from_args(cls, args)


@dataclass(kw_only=True)
class AdvantageConfig:
    """Outcome-reward advantages and the policies around them (see docs/normalization.md)."""

    adv_estimator: str = field(default="grpo", metadata={
        "help": "grpo: (r - group mean) / (group std + eps); rloo: r - mean of the other valid rows; "
                "dr_grpo: r - group mean", "choices": ADV_ESTIMATORS})
    mean_level: Optional[str] = field(default=None, metadata={
        "help": "level of the baseline mean (default: from the estimator)", "choices": NORM_LEVELS,
        "flag": "--adv-mean-level"})
    std_level: Optional[str] = field(default=None, metadata={
        "help": "level of the std divisor (default: from the estimator); group mean with batch std is "
                "LitePPO", "choices": NORM_LEVELS, "flag": "--adv-std-level"})
    leave_one_out: Optional[bool] = field(default=None, metadata={
        "help": "baseline = mean of the other valid rows of the group (default: true for rloo)",
        "flag": "--adv-leave-one-out"})
    eps: float = field(default=1e-6, metadata={"help": "added to the std", "flag": "--adv-eps"})
    unbiased_std: bool = field(default=True, metadata={
        "help": "unbiased (n - 1) std", "flag": "--adv-unbiased-std"})
    overlong_policy: str = field(default="keep", metadata={
        "help": "rows that ended without EOS: keep (like any row), zero_advantage (out of the statistics, "
                "advantage 0, tokens still counted), mask (out of the statistics and the loss)",
        "choices": OVERLONG_POLICIES})
    min_valid_group_size: int = field(default=1, metadata={
        "help": "groups with fewer valid rows are dropped from the step (statistics and loss)"})

    def __post_init__(self) -> None:
        _choice(self.adv_estimator, ADV_ESTIMATORS, "adv_estimator")
        mean_d, std_d, loo_d = _ESTIMATOR_DEFAULTS[self.adv_estimator]
        self.mean_level = _choice(mean_d if self.mean_level is None else self.mean_level, NORM_LEVELS,
                                  "mean_level")
        self.std_level = _choice(std_d if self.std_level is None else self.std_level, NORM_LEVELS,
                                 "std_level")
        if self.leave_one_out is None:
            self.leave_one_out = loo_d
        if self.leave_one_out and self.mean_level != "group":
            raise ValueError(f"leave_one_out needs mean_level='group', got {self.mean_level!r}")
        _choice(self.overlong_policy, OVERLONG_POLICIES, "overlong_policy")
        self.eps = _finite(self.eps, "eps", low=0.0, low_open=True)
        positive_int(self.min_valid_group_size, "min_valid_group_size", must="an int >= 1")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "AdvantageConfig":
        return _from_args(cls, args)


# ----------------------------------------------------------------------------------------------
# argparse
# ----------------------------------------------------------------------------------------------

def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _arg_type(f: dataclasses.Field):
    if f.name == "loss_aggregation":
        return _argparse_checked(resolve_aggregation)
    if f.name in ("kl_aggregation", "entropy_aggregation"):
        return _argparse_checked(lambda v: resolve_term_aggregation(v, f.name))
    base = f.type if isinstance(f.type, type) else str(f.type)
    if "int" in str(base):
        return int
    if "float" in str(base):
        return float
    return str


def _argparse_checked(fn):
    def convert(value: str):
        try:
            return fn(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = "name"
    return convert


def _add_group(parser: argparse.ArgumentParser, cls, title: str) -> None:
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        kwargs = {"dest": f.name, "default": f.default, "help": f.metadata.get("help", "")}
        if "bool" in str(f.type):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _arg_type(f)
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        group.add_argument(_flag(f), **kwargs)


def add_loss_aggregation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the plugin's flags to ``parser`` and return it (Megatron-LM ``extra_args_provider`` form).

    Loss flags: --loss-aggregation, --max-response-length, --kl-coef, --kl-estimator, --entropy-coef,
    --kl-aggregation, --entropy-aggregation, --clip-eps-low, --clip-eps-high, --dual-clip-c, and the
    off-policy correction --is-level, --is-mode, --is-low, --is-high, --is-veto, --is-denominator,
    --is-self-normalize.
    Advantage flags: --adv-estimator, --adv-mean-level, --adv-std-level, --adv-leave-one-out, --adv-eps,
    --adv-unbiased-std, --overlong-policy, --min-valid-group-size.
    """
    _add_group(parser, LossConfig, "RL loss aggregation (megatron_rl_agg)")
    _add_group(parser, AdvantageConfig, "RL advantages (megatron_rl_agg)")
    return parser


def _from_args(cls, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**values)
