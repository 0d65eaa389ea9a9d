"""The trainer's token sampling draws from ``softmax(z / T)``: a chi-square test of the tokens
``sample_tokens`` picks with ``GumbelNoise`` (what on-policy generation calls) on fixed logits.

The cached-vs-recompute generation tests compare two paths through the same sampler, so a sampler that
ignored the temperature would pass them; this test fails then. Single process, no model: the draws
depend on the seed alone (counter-based noise), so the statistic is the same on every run.
"""

import math

import pytest
import torch

from megatron_rl_agg.trainer.rollout.generation import GumbelNoise, RolloutSpec, sample_tokens

LOGITS = torch.tensor([0.0, 0.4, 0.8, 1.2, 1.6, 2.0])
ROWS, POSITIONS = 100, 200
DRAWS = ROWS * POSITIONS
# p-value below which the sampled counts are declared not to follow the distribution
ALPHA = 1e-3


def _draw(temperature: float, step: int) -> torch.Tensor:
    """``[V]`` counts of ``DRAWS`` tokens sampled at ``temperature`` from ``LOGITS`` (``ROWS`` rows, each
    drawing ``POSITIONS`` tokens one position at a time, as generation does)."""
    spec = RolloutSpec(task=None, num_prompts=ROWS, samples_per_prompt=1, max_new_tokens=POSITIONS,
                       temperature=temperature, failure_prob=0.0, vocab_size=LOGITS.numel(), seed=11)
    noise = GumbelNoise(spec, step, 0, ROWS)
    every = torch.ones(ROWS, dtype=torch.bool)
    tokens = torch.cat([sample_tokens(LOGITS.expand(ROWS, -1), noise.draw(torch.full((ROWS,), j), every),
                                      temperature) for j in range(POSITIONS)])          # [DRAWS]
    return torch.bincount(tokens, minlength=LOGITS.numel()).double()


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic ``sum (O - E)^2 / E`` and its p-value (chi-square, ``V - 1`` dof)."""
    expected = probs.double() * counts.sum()
    assert expected.min() >= 50, expected          # the chi-square approximation needs large E
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((counts.numel() - 1) / 2, dtype=torch.float64)
    return float(stat), float(torch.special.gammaincc(dof, stat / 2))


def test_chi_square_p_value_matches_the_table():
    """5 dof: the 0.05 and 0.001 critical values of the chi-square table."""
    for critical, p in ((11.0705, 0.05), (20.5150, 0.001)):
        stat = torch.tensor(critical, dtype=torch.float64)
        assert float(torch.special.gammaincc(torch.tensor(2.5, dtype=torch.float64), stat / 2)) == \
            pytest.approx(p, rel=1e-4)


@pytest.mark.parametrize("temperature, step", [(0.5, 0), (1.5, 1)])
def test_sampled_tokens_follow_the_tempered_softmax(temperature, step):
    counts = _draw(temperature, step)
    assert counts.sum() == DRAWS
    stat, p = _chi_square_p(counts, torch.softmax(LOGITS / temperature, dim=-1))
    assert p > ALPHA, f"T={temperature}: chi-square {stat:.1f}, p={p:.2e}, counts {counts.tolist()}"
    # the test has the power to see a dropped temperature: the same counts are far from softmax(z)
    stat_untempered, p_untempered = _chi_square_p(counts, torch.softmax(LOGITS, dim=-1))
    assert p_untempered < 1e-12 and stat_untempered > 20 * stat, (stat, stat_untempered)


def test_temperature_changes_the_draws():
    """Lower T sharpens: the top token's frequency grows as T falls (and matches its probability)."""
    top = {t: float(_draw(t, 2)[-1]) / DRAWS for t in (0.5, 1.0, 1.5)}
    assert top[0.5] > top[1.0] > top[1.5]
    for t, freq in top.items():
        p = float(torch.softmax(LOGITS / t, dim=-1)[-1])
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / DRAWS), (t, freq, p)
