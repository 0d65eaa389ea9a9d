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
from megatron_rl_agg.core.policy_losses import POLICY_LOSS_ALIASES, POLICY_LOSSES, SEQUENCE, get_policy_loss

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

# LossConfig fields that are parameters of some policy loss (None: the chosen loss's paper default)
_POLICY_PARAMS = ("clip_eps_low", "clip_eps_high", "dual_clip_c", "tau_pos", "tau_neg", "dppo_tv_delta",
                  "dppo_kl_delta")
# Aggregations a sequence-level loss (a per-sequence constant on each loss token) cannot take, and why.
_SEQUENCE_REFUSED = {
    "token_sum": "would multiply each sequence's loss by its length, unnormalized",
    "seq_mean_token_sum": "would multiply each sequence's loss by its length",
    "seq_mean_token_sum_norm": "would weight each sequence's loss by its length over a horizon that "
                               "normalizes token sums of per-token terms, not a sequence ratio",
    "token_mean_legacy": "would make the objective depend on the micro-batch split (a mean of micro-batch "
                         "means, the layout dependence of a plain micro-batch mean)",
}
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
    policy_loss: str = field(default="ppo_clip", metadata={
        "help": "policy loss: " + ", ".join(POLICY_LOSSES) + " (aliases: "
                + ", ".join(f"{k} -> {v}" for k, v in POLICY_LOSS_ALIASES.items()) + "); see docs/aggregation.md"})
    clip_eps_low: Optional[float] = field(default=None, metadata={
        "help": "ratio clip below, r >= 1 - eps_low (ppo_clip 0.2, gspo/gspo_token 3e-4, cispo 1.0 = no lower "
                "bound; gmpo: in log space, log r >= -eps_low, 0.4); default: the chosen loss's"})
    clip_eps_high: Optional[float] = field(default=None, metadata={
        "help": "ratio clip above, r <= 1 + eps_high (ppo_clip 0.2, DAPO clip-higher 0.28, gspo/gspo_token 4e-4, "
                "cispo 0.28; gmpo: log r <= eps_high, 0.4); default: the chosen loss's"})
    dual_clip_c: Optional[float] = field(default=None, metadata={
        "help": "ppo_clip: dual-clip constant c > 1 bounding the loss of negative-advantage tokens (off when "
                "unset)"})
    tau_pos: Optional[float] = field(default=None, metadata={
        "help": "sapo: gate temperature of positive-advantage tokens (default 1.0)"})
    tau_neg: Optional[float] = field(default=None, metadata={
        "help": "sapo: gate temperature of negative-advantage tokens (default 1.05)"})
    dppo_tv_delta: Optional[float] = field(default=None, metadata={
        "help": "dppo_tv: total-variation trust region abs(p - p_old) <= delta, in (0, 1] (default 0.2)"})
    dppo_kl_delta: Optional[float] = field(default=None, metadata={
        "help": "dppo_kl: binary-KL trust region KL <= delta, > 0 (default 0.05)"})
    temperature: float = field(default=1.0, metadata={
        "help": "sampling temperature T > 0: rollouts are drawn from softmax(z / T), and every log-prob "
                "and entropy of the loss (policy, behaviour, reference) is computed from z / T, so the "
                "on-policy ratio is exactly 1"})
    """Sampling temperature ``T``: the loss, the behaviour and reference log-probs and the entropy all use
    ``log softmax(z / T)`` (the distribution the rollouts were drawn from). ``T = 1`` divides nothing."""
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
        self.temperature = _finite(self.temperature, "temperature (--temperature)", low=0.0, low_open=True)
        for name in ("kl_coef", "entropy_coef"):
            setattr(self, name, _finite(getattr(self, name), name, low=0.0))
        self._resolve_policy_loss()
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

    def _resolve_policy_loss(self) -> None:
        """The loss's name made canonical, its unset parameters set to the paper's defaults, every value
        range-checked (naming the flag), and a parameter of another loss refused."""
        try:
            loss = get_policy_loss(self.policy_loss)
        except ValueError as err:
            raise ValueError(f"policy_loss (--policy-loss): {err}") from None
        self.policy_loss = loss.name
        if loss.level == SEQUENCE and self.loss_aggregation in _SEQUENCE_REFUSED:
            raise ValueError(
                f"policy_loss={loss.name!r} gives every token of a sequence the sequence's loss, so "
                f"loss_aggregation={self.loss_aggregation!r} {_SEQUENCE_REFUSED[self.loss_aggregation]}; use "
                f"{loss.paper_mode} (the paper's per-sequence mean), token_mean (length-weighted) or prompt_mean")
        for name in _POLICY_PARAMS:
            if name not in loss.params and getattr(self, name) is not None:
                owners = [p.name for p in POLICY_LOSSES.values() if name in p.params]
                raise ValueError(f"{name} (--{name.replace('_', '-')}) is a parameter of {', '.join(owners)}, "
                                 f"not of policy_loss={loss.name!r}; drop it or choose one of those losses")
        for name, default in loss.params.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        flag = lambda n: f"{n} (--{n.replace('_', '-')})"                                    # noqa: E731
        if "clip_eps_low" in loss.params:
            # ratio space: the lower bound 1 - eps_low must stay >= 0; gmpo clips log r, any eps >= 0
            high = math.inf if loss.name == "gmpo" else 1.0
            self.clip_eps_low = _finite(self.clip_eps_low, flag("clip_eps_low"), low=0.0, high=high,
                                        high_open=False)
            self.clip_eps_high = _finite(self.clip_eps_high, flag("clip_eps_high"), low=0.0)
        if self.dual_clip_c is not None:
            self.dual_clip_c = _finite(self.dual_clip_c, flag("dual_clip_c"), low=1.0, low_open=True)
        for name in ("tau_pos", "tau_neg", "dppo_kl_delta"):
            if name in loss.params:
                setattr(self, name, _finite(getattr(self, name), flag(name), low=0.0, low_open=True))
        if "dppo_tv_delta" in loss.params:
            self.dppo_tv_delta = _finite(self.dppo_tv_delta, flag("dppo_tv_delta"), low=0.0, low_open=True,
                                         high=1.0, high_open=False)

    @property
    def policy_loss_params(self) -> dict:
        """The chosen loss's parameters (``{name: value}``), as its registry function takes them."""
        return {name: getattr(self, name) for name in get_policy_loss(self.policy_loss).params}

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
    if f.name == "policy_loss":
        return _argparse_checked(lambda v: get_policy_loss(v).name)
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
    --kl-aggregation, --entropy-aggregation, --policy-loss, --clip-eps-low, --clip-eps-high, --dual-clip-c,
    --tau-pos, --tau-neg, --dppo-tv-delta, --dppo-kl-delta, --temperature, and the off-policy correction
    --is-level, --is-mode, --is-low, --is-high, --is-veto, --is-denominator, --is-self-normalize.
    Advantage flags: --adv-estimator, --adv-mean-level, --adv-std-level, --adv-leave-one-out, --adv-eps,
    --adv-unbiased-std, --overlong-policy, --min-valid-group-size.
    """
    _add_group(parser, LossConfig, "RL loss aggregation (megatron_rl_agg)")
    _add_group(parser, AdvantageConfig, "RL advantages (megatron_rl_agg)")
    return parser


def _from_args(cls, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**values)
